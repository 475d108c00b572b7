"""A training run's data as ``train`` and ``plan`` read it: every source named by ``data``
(what each file of a folder is for, ``--columns``, ``--max-samples``, the mix of weighted
sources), what was read, skipped and left out said as events, and the records as the training
job carries them, split into training and validation.

``cfg`` is the run's ``TrainConfig`` (duck-typed: ``edge_tune.config`` imports this package)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edge_tune.data.formats import ReadResult, job_record, read_records
from edge_tune.data.preference import check_method
from edge_tune.data.split import split_validation
from edge_tune.events import EventSink, Log


def read_data(path: str, cfg, on_event: EventSink) -> ReadResult:
    """The records of a data file (``cfg.format``, ``cfg.skip_invalid``), with what was read
    and skipped reported as events."""
    from edge_tune.data.preference import unpaired

    result = read_records(path, fmt=cfg.format, skip_invalid=cfg.skip_invalid,
                          reasoning=cfg.reasoning)
    if result.skipped:
        lines = ", ".join(str(n) for n, _ in result.skipped[:20])
        more = " ..." if len(result.skipped) > 20 else ""
        on_event(Log(f"{path}: skipped {len(result.skipped)} invalid records (lines {lines}{more});"
                     f" first: {result.skipped[0][1]}", "warning"))
    on_event(Log(f"{path}: {len(result.records)} records, format {result.format}"))
    extra = _extra_keys_read(result)
    if extra:
        on_event(Log(f"{path}: also read: {extra}"))
    if result.ignored:
        on_event(Log(f"{path}: {result.ignored_line()} (not read by edge-tune; "
                     "docs/data.md lists the keys each format reads)", "warning"))
    result.records, left_out = unpaired(result.records, cfg.method, cfg.desirable_only, path)
    result.undesirable_left_out = left_out
    if left_out:
        on_event(Log(f"{path}: --desirable-only: trained {len(result.records)} desirable "
                     f"answers; left out {left_out} undesirable ones (label false)"))
    return result


def read_train_data(cfg, on_event: EventSink) -> tuple[ReadResult, Optional[ReadResult], dict]:
    """The training data of a run as ``cfg`` names it (``data``: one or several sources,
    ``columns``, ``max_samples``): ``(training ReadResult, the folders' validation ReadResult
    or None, the manifest's additions)``. Says, one line each, what every file is for
    (train/valid/test of a folder: :mod:`edge_tune.data.layouts`), what ``--max-samples`` cut
    and the mix of weighted sources. A folder's valid files are the validation set unless
    ``--val``/``--val-split`` is given (then said to be unused); test files are never read."""
    from edge_tune.data.layouts import columns_text, data_spec, say_parts
    from edge_tune.data.readers import source_parts

    spec = data_spec(cfg.data, cfg.columns, cfg.max_samples, cfg.seed)
    other_val = "--val" if cfg.val else "--val-split" if cfg.val_split else ""
    files = say_parts(source_parts(spec), on_event, other_val)
    if spec.columns:
        on_event(Log(f"--columns {columns_text(spec.columns)}: source columns renamed to "
                     "edge-tune keys"))
    result = read_data(spec, cfg, on_event)
    if cfg.max_samples is not None:
        cut = [f"{s.name} {s.read}" for s in spec.opened]
        on_event(Log(f"--max-samples {cfg.max_samples}: read at most the first "
                     f"{cfg.max_samples} records of each source ({', '.join(cut)})"))
    mix = [{"source": s.name, "weight": s.weight, "read": s.read, "used": s.used}
           for s in spec.opened]
    mixed = len(mix) > 1 or any(m["weight"] != 1.0 for m in mix)
    if mixed:
        said = ", ".join(f"{m['source']} {m['read']} x{m['weight']:g} = {m['used']}"
                         for m in mix)
        on_event(Log(f"mix (seed {cfg.seed}): {said}; {sum(m['used'] for m in mix)} "
                     "training rows"))
    val = None
    if files.get("valid"):
        val = read_data(spec.with_role("valid"), cfg, on_event)
    extra = {"files": files or None, "mix": mix if mixed else None}
    return result, val, extra


# The keys that make a record of its format: not worth a line of their own.
_CORE_KEYS = {"messages", "conversations", "instruction", "input", "output", "prompt",
              "completion", "chosen", "rejected", "text", "preferred_output",
              "non_preferred_output", "role", "content", "from", "value"}


def _extra_keys_read(result) -> str:
    """``system -> a system message ... (12 records); history -> ...``: the keys beyond each
    format's core that shaped what is trained, so a change in reading is never silent."""
    used = result.keys_report()["used"]
    return "; ".join(f"{k} -> {v['to']} ({v['records']})" for k, v in used.items()
                     if k.rsplit(".", 1)[-1] not in _CORE_KEYS)


@dataclass
class TrainingData:
    """A run's data, read and split. ``read``: the training sources as read (records, format,
    skipped lines, keys); ``records``: all of them as the job carries them (:func:`job_record`
    dicts); ``train`` / ``val``: those split into training and validation; ``extra``: the
    manifest's ``files`` (train/valid/test of a folder) and ``mix``."""
    read: ReadResult
    records: list[dict]
    train: list[dict]
    val: list[dict]
    extra: dict


def read_training_data(cfg, spec, on_event: EventSink, val_file: bool = True) -> TrainingData:
    """The data of a run (:func:`read_train_data`) checked against ``cfg.method`` (a mismatch
    raises DataError before anything read is said), then split: validation is ``cfg.val``'s
    file (``val_file`` False: not read), else the folder's valid files, else ``cfg.val_split``
    of the training records (``split_validation``). ``spec``: the data as the run names it
    (for messages)."""
    if cfg.method == "grpo":
        return read_prompt_data(cfg, spec, on_event)
    said: list = []  # what reading says waits until the data is known to fit --method
    data, folder_val, extra = read_train_data(cfg, said.append)
    check_method(cfg.method, data.format, str(spec))
    for event in said:
        on_event(event)
    records = [job_record(r) for r in data.records]
    given = read_data(cfg.val, cfg, on_event) if cfg.val and val_file else folder_val
    train, val = split_validation(records, cfg.val_split, cfg.seed,
                                  [job_record(r) for r in given.records] if given else None)
    return TrainingData(data, records, train, val, extra)


def read_prompt_data(cfg, spec, on_event: EventSink) -> TrainingData:
    """GRPO's data: prompt records (:mod:`edge_tune.data.prompts`) and their columns, said
    as events, split as :func:`read_training_data` splits."""
    from collections import Counter

    from edge_tune.data.formats import Record
    from edge_tune.data.layouts import data_spec
    from edge_tune.data.prompts import read_prompts

    def read(source) -> tuple[ReadResult, list[dict]]:
        got = read_prompts(source, cfg.skip_invalid)
        if got.skipped:
            on_event(Log(f"{source}: skipped {len(got.skipped)} invalid prompt records; "
                         f"first: {got.skipped[0][1]}", "warning"))
        result = ReadResult([Record(r["messages"], 0, where=r["where"]) for r in got.records],
                            "prompts", skipped=got.skipped, used=Counter(got.columns))
        return result, got.records

    data, records = read(data_spec(cfg.data, cfg.columns, cfg.max_samples, cfg.seed))
    cols = ", ".join(f"{k} ({n})" for k, n in sorted(data.used.items()))
    on_event(Log(f"{spec}: {len(records)} prompt records; "
                 + (f"columns handed to the rewards: {cols}" if cols else "no other columns")))
    given = read(data_spec(cfg.val, cfg.columns))[1] if cfg.val else None
    train, val = split_validation(records, cfg.val_split, cfg.seed, given)
    return TrainingData(data, records, train, val, {})


def data_record(data: TrainingData, spec, cfg, data_sha256: Optional[str]) -> dict:
    """The manifest's ``data`` section of a run (without its replay records): the source
    (:func:`_data_path`), format, sha256, what was skipped, ignored and left out, record
    counts, the system prompt all records shared, the validation file and the folder's files
    and mix."""
    read = data.read
    return {"path": _data_path(spec), "format": read.format, "sha256": data_sha256,
            "skipped": len(read.skipped),
            "ignored_keys": dict(read.ignored.most_common()),
            "undesirable_left_out": read.undesirable_left_out,
            "records": len(read.records),
            # the system prompt all records shared: chat/serve's default
            **({"system": shared} if (shared := shared_system(read.records)) else {}),
            "val": str(Path(cfg.val).resolve()) if cfg.val else _one(data.extra, "valid"),
            "val_records": len(data.val), **data.extra}


def shared_system(records) -> Optional[str]:
    """The system prompt every record (:class:`edge_tune.data.formats.Record`) begins with,
    when they all begin with the same one; None when one has none, they differ, or a record
    is plain text. Recorded in the manifest: the adapter learned its answers after it, so
    ``chat``/``serve`` send it when a conversation has no system message. Pure."""
    found = None
    for r in records:
        msgs = r.messages or []
        first = msgs[0] if msgs else None
        if first is None or first.get("role") != "system" or \
                not isinstance(first.get("content"), str) or not first["content"].strip():
            return None
        if found is not None and first["content"] != found:
            return None
        found = first["content"]
    return found


def _data_path(spec) -> str:
    """The manifest's ``data.path``: the one source's absolute path (a hub spec as given), or
    every source's spec joined with `` + `` when several are mixed."""
    if len(spec.specs) == 1 and not spec.specs[0].hub and spec.specs[0].text == \
            spec.specs[0].target:
        return str(Path(spec.specs[0].target).resolve())
    return str(spec)


def _one(extra: dict, role: str):
    """The single file of ``role`` (absolute), for the manifest's ``val``; None otherwise."""
    found = (extra.get("files") or {}).get(role) or []
    return str(Path(found[0]).resolve()) if len(found) == 1 and Path(found[0]).is_file() \
        else None
