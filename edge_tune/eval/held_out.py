"""The held-out inputs of ``eval``: the records (``--data``, the run's test files, its
validation file or its seeded validation split), the tokenizer training used, and each
record's generation task. transformers is imported inside :func:`run_tokenizer`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edge_tune.errors import DataError, UsageError


def held_out_records(man, data: Optional[Path]) -> tuple[list, str]:
    """(records, where they came from): ``data``, else the test files of the run's data folder
    (``DIR/test.jsonl``: never trained), else the run's validation file, else its seeded
    validation split. Raises DataError when there is none of them."""
    from edge_tune.data.formats import read_records
    from edge_tune.data.layouts import data_spec
    from edge_tune.data.split import split_validation

    hp, recorded = man.hyperparameters.to_dict(), man.data.to_dict()
    fmt, skip = hp.get("format", "auto"), bool(hp.get("skip_invalid", False))
    reasoning = hp.get("reasoning") or "auto"  # read as training read it
    columns = hp.get("columns")  # the run's --columns map every file it reads
    if data is not None:
        if not Path(data).is_file():
            raise UsageError("no such file", setting="data", value=data)
        return read_records(data_spec(str(data), columns), fmt="auto", skip_invalid=skip,
                            reasoning=reasoning).records, f"--data {data}"
    tests = (recorded.get("files") or {}).get("test") if isinstance(recorded.get("files"),
                                                                     dict) else None
    if tests:  # the data folder's test files: left for eval by training (data/layouts.py)
        gone = [t for t in tests if not Path(t).is_file()]
        if gone:
            raise DataError(f"{gone[0]}: the run's test file is gone; give --data FILE")
        records = [r for t in tests for r in read_records(
            data_spec(t, columns), fmt=fmt, skip_invalid=skip, reasoning=reasoning).records]
        return records, f"test file {', '.join(tests)}"
    if recorded.get("val"):
        path = recorded["val"]
        if not Path(path).is_file():
            raise DataError(f"{path}: the run's validation file is gone; give --data FILE")
        return read_records(data_spec(path, columns), fmt=fmt, skip_invalid=skip,
                            reasoning=reasoning).records, f"validation file {path}"
    if hp.get("val_split"):
        path = recorded.get("path") or hp.get("data")
        mixed = isinstance(hp.get("data"), list)  # several sources: path is their specs
        if not path or not (Path(path).exists() or mixed):
            raise DataError(f"{path}: the run's data file is gone (its --val-split share is the "
                            "held-out data); give --data FILE")
        spec = data_spec(hp["data"] if mixed else path, columns,
                         hp.get("max_samples"), hp.get("seed", 0))  # as training read it
        records = read_records(spec, fmt=fmt, skip_invalid=skip, reasoning=reasoning).records
        _, held = split_validation(records, hp["val_split"], hp.get("seed", 0))
        return held, (f"the {len(held)} records --val-split {hp['val_split']} held back from "
                      f"{path} (seed {hp.get('seed', 0)})")
    raise DataError("the run held no data back from training (no --val, --val-split 0); give "
                    "held-out examples with --data FILE")


def run_tokenizer(man, base_gguf: Path):
    """The tokenizer training used (the run's HF copy of the base), with the run's chat
    template; from the GGUF itself when that copy is gone (transformers rebuilds it)."""
    from transformers import AutoTokenizer

    from edge_tune.models import quiet_hf

    quiet_hf()
    hf_dir = man.base.hf_dir
    if hf_dir and Path(hf_dir).is_dir():
        tok = AutoTokenizer.from_pretrained(hf_dir)
    else:
        tok = AutoTokenizer.from_pretrained(str(base_gguf.parent), gguf_file=base_gguf.name)
    if man.chat_template:
        tok.chat_template = man.chat_template
    return tok


def held_out_examples(records: list, tok, hp: dict, system_mode: str, on_event) -> list:
    """``records`` tokenized as training tokenized them (the run's hyperparameters ``hp``:
    ``seq_len``, ``train_on``, ``overflow``, ``skip_invalid``; ``system_mode``): the
    backends' examples (input ids and the trained tokens' mask). Only the tokenizer's
    warnings reach ``on_event``, not its progress."""
    from edge_tune.training.worker import tokenize_records
    from edge_tune.data.formats import job_record
    from edge_tune.events import Log

    def emit(event):  # the tokenizer's own progress is noise here; its warnings are not
        if isinstance(event, Log):
            on_event(event)

    return tokenize_records(tok, [job_record(r) for r in records], int(hp.get("seq_len") or 512),
                            emit, "held-out", hp.get("train_on") == "all",
                            hp.get("overflow", "truncate"),
                            skip_invalid=bool(hp.get("skip_invalid")), system_mode=system_mode)


@dataclass
class _Item:
    """One held-out record's generation task: the conversation before its last trained
    assistant turn, and that turn's text."""
    prompt: list
    reference: str


def generation_items(records: list) -> list[_Item]:
    """A (prompt, reference) per conversation whose last trained assistant turn has text."""
    items = []
    for r in records:
        msgs = r.messages or []
        last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"
                    and m.get("weight", 1) != 0), default=None)
        if last is None or not isinstance(msgs[last].get("content"), str) or \
                not msgs[last]["content"].strip():
            continue
        prompt = [{k: v for k, v in m.items() if k != "weight"} for m in msgs[:last]]
        items.append(_Item(prompt, msgs[last]["content"]))
    return items
