"""``edge-tune data inspect``: what a data file looks like to the trainer, before training.

:func:`inspect_data` reads the file exactly as ``train`` does, tokenizes every record with the
model's own tokenizer and chat template (the same
:func:`~edge_tune.data.template.encode_examples` the trainer uses), and returns plain, JSON-safe data: the format, the record count, token-length
statistics and a histogram, the share of tokens that carry loss, how many examples ``--seq-len``
would cut, the tool-calling data it holds (records with ``tools``, tool calls, tool results,
``weight: 0`` turns), and the first example rendered with its trained character spans (a
record trains as one example per assistant turn when the template rewrites earlier turns). A
preference record (DPO/ORPO) counts as two sequences, and its first example shows both sides:
the chosen answer (pushed up) and the rejected one (pushed down).

The statistics helpers (:func:`length_stats`, :func:`histogram`, :func:`merge_spans`) are pure.
transformers is imported inside :func:`inspect_data` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

from edge_tune.errors import DataError, EdgeTuneError, NetworkError, UsageError
from edge_tune.events import EventSink, Log, Progress, ignore

# ---- pure helpers ------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already-sorted values, linearly interpolated
    between the closest ranks (numpy's default method)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _num(x: float):
    """An int when the value is whole (lengths are token counts), else rounded to 0.1."""
    return int(x) if float(x).is_integer() else round(x, 1)


def length_stats(lengths: Sequence[int]) -> dict:
    """min, median, p95, max and mean of a list of lengths (all None when it is empty)."""
    if not lengths:
        return {"min": None, "median": None, "p95": None, "max": None, "mean": None}
    s = sorted(lengths)
    return {"min": s[0], "median": _num(percentile(s, 50)), "p95": _num(percentile(s, 95)),
            "max": s[-1], "mean": round(sum(s) / len(s), 1)}


def histogram(lengths: Sequence[int], bins: int = 10) -> list[dict]:
    """Integer lengths in at most ``bins`` equal-width bins: ``[{lo, hi, count}, ...]`` with
    ``lo..hi`` inclusive, consecutive, covering min..max. Fewer bins when the lengths span
    fewer values than ``bins``; no bins for no lengths."""
    if bins < 1:
        raise ValueError("bins must be >= 1")
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    width = max(1, math.ceil((hi - lo + 1) / bins))
    n = math.ceil((hi - lo + 1) / width)
    counts = [0] * n
    for x in lengths:
        counts[(x - lo) // width] += 1
    return [{"lo": lo + i * width, "hi": min(hi, lo + (i + 1) * width - 1), "count": c}
            for i, c in enumerate(counts)]


def merge_spans(spans: Sequence[Sequence[int]]) -> list[list[int]]:
    """Sorted ``[start, end)`` spans with overlapping or touching ones merged; empty ones
    dropped."""
    out: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in spans if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def summarize(lengths: Sequence[int], trained: Sequence[int], seq_len: int,
              trained_kept: Sequence[int]) -> dict:
    """The counts of the report from per-example numbers: full lengths, trained tokens, and
    trained tokens left after the cut at ``seq_len``."""
    total, n_trained = sum(lengths), sum(trained)
    return {
        "tokens_total": total,
        "tokens_trained": n_trained,
        "trained_share": round(n_trained / total, 4) if total else 0.0,
        "lengths": length_stats(lengths),
        "histogram": histogram(lengths),
        "seq_len": seq_len,
        "truncated": sum(1 for n in lengths if n > seq_len),
        # Training skips an example whose cut leaves no trained token at all.
        "dropped": sum(1 for k in trained_kept if k == 0),
        "tokens_trained_within_seq_len": sum(trained_kept),
    }


# ---- the core function -------------------------------------------------------------------------


def _load_tokenizer(model: str, on_event: EventSink):
    """The tokenizer training uses, without its weights: a hub model's tokenizer files; a GGUF's
    from the dequantized copy training made when it is cached, else from the GGUF's own header
    (transformers rebuilds it from the vocabulary there, as it did for that copy: the same
    tokens; ~20-30 s for a 49k vocabulary, no weights read, nothing cached); a directory's own.
    Raises DataError (NetworkError for the hub) in one line when it cannot be loaded."""
    from edge_tune import models

    ref = models.resolve(model, on_event)
    try:
        from transformers import AutoTokenizer

        if ref.hub_id and ref.hf_dir is None:  # only the tokenizer files, not the weights
            on_event(Log(f"loading the tokenizer of {ref.hub_id} from the Hugging Face hub"))
            return AutoTokenizer.from_pretrained(ref.hub_id)
        if ref.gguf is not None and ref.hf_dir is None:
            from edge_tune.fsutil import cache_dir, sha256_file

            copy = cache_dir() / "hf" / sha256_file(ref.gguf)[:16]  # as models.dequantized_copy
            if (copy / "config.json").is_file():
                return AutoTokenizer.from_pretrained(str(copy))
            models.quiet_hf()
            on_event(Log(f"reading the tokenizer from {ref.gguf.name} (its weights are not "
                         "loaded)"))
            return AutoTokenizer.from_pretrained(str(ref.gguf.parent), gguf_file=ref.gguf.name)
        return AutoTokenizer.from_pretrained(str(models.hf_dir_for(ref, on_event)))
    except EdgeTuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken directory, no network: one line for the user
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        kind = NetworkError if ref.hub_id else DataError
        raise kind("could not load its tokenizer "
                   f"({type(exc).__name__}: {first})", setting="model", value=model)


def _shown(tok, rendered, seq_len: int) -> dict:
    """One example as shown: rendered text, trained character spans, where ``seq_len`` cuts it
    (None when it fits)."""
    from edge_tune.data.template import tokenize_spans

    # The very tokenization and labels training uses, so the highlight is what is trained.
    _, offsets, inside = tokenize_spans(tok, rendered.text, rendered.spans)
    trained = [span for span, flag in zip(offsets, inside) if flag]
    cut = offsets[seq_len - 1][1] if len(offsets) > seq_len else None
    return {"text": rendered.text, "spans": merge_spans(trained), "cut": cut}


def _first_example(tok, record, seq_len: int, system_mode: str = "keep",
                   train_on_all: bool = False) -> dict:
    """The first record as the model sees it: rendered text, trained character spans, and
    where ``seq_len`` cuts it (None when it fits). A record that trains as several examples
    (one per assistant turn) gives the first here and the rest under ``more``."""
    if record.messages is None:
        text = record.text
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        n = len(enc["input_ids"]) + (tok.eos_token_id is not None)
        cut = None
        if n > seq_len:
            offsets = enc["offset_mapping"]
            cut = offsets[seq_len - 1][1] if seq_len <= len(offsets) else len(text)
        return {"text": text, "spans": [[0, len(text)]] if text else [], "cut": cut}
    from edge_tune.data.template import render_examples

    parts = [_shown(tok, r, seq_len) for r in render_examples(
        tok, record.messages, record.tools, system_mode=system_mode, where=record.where,
        train_on_all=train_on_all)]
    out = {**parts[0], "more": parts[1:], "tools": tool_names(record.tools),
           "tool_calls": sum(len(m.get("tool_calls") or []) for m in record.messages)}
    if record.rejected is not None:  # a preference pair: the chosen side above, and this one
        out.update(parts[-1], more=[])
        out["rejected"] = _shown(tok, render_examples(
            tok, record.rejected, record.tools, system_mode=system_mode,
            where=record.where)[-1], seq_len)
    return out


def tool_names(tools) -> list[str]:
    """The function names of a record's ``tools`` schemas."""
    return [(t.get("function") if isinstance(t.get("function"), dict) else t).get("name")
            for t in tools or []]


def tool_counts(records) -> dict:
    """How much tool-calling data there is: records with ``tools`` schemas, assistant tool
    calls, ``tool`` results (context, never trained) and assistant turns with ``weight: 0``
    (context, not trained)."""
    msgs = [m for r in records for m in (r.messages or [])]
    return {"records_with_tools": sum(1 for r in records if r.tools),
            "tool_calls": sum(len(m.get("tool_calls") or []) for m in msgs),
            "tool_results": sum(1 for m in msgs if m["role"] == "tool"),
            "context_turns": sum(1 for m in msgs
                                 if m["role"] == "assistant" and m.get("weight") == 0)}


def inspect_data(path, model: str = "default", seq_len: int = 512, fmt: str = "auto",
                 on_event: EventSink = ignore, template: Optional[str] = None,
                 skip_invalid: bool = False, system_mode: str = "keep",
                 reasoning: str = "auto") -> dict:
    """Read and tokenize a data file as ``train`` would; returns a JSON-safe report (see the
    module docstring). ``template``: the Jinja text of ``--chat-template NAME|FILE``
    (:func:`edge_tune.templates.choice.given`), used instead of the model's own;
    ``reasoning``: ``--reasoning auto|inline|drop``. Raises EdgeTuneError for bad data (a
    record the template cannot train: ``FILE:LINE: ...``, unless ``skip_invalid``), a bad
    ``--model`` or ``--seq-len``."""
    from edge_tune import models
    from edge_tune.data.formats import read_records

    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise UsageError("must be a whole number of tokens >= 1",
                         setting="seq_len", value=seq_len)
    models.check_spec(model)  # bad input fails fast, before any heavy work
    data = read_records(path, fmt=fmt, skip_invalid=skip_invalid, reasoning=reasoning)
    tok = _load_tokenizer(model, on_event)
    if template is not None:
        tok.chat_template = template
    return inspect_records(tok, data, str(path), model, seq_len, on_event,
                           skip_invalid=skip_invalid, system_mode=system_mode)


def inspect_records(tok, data, path: str, model: str, seq_len: int,
                    on_event: EventSink = ignore, skip_invalid: bool = False,
                    system_mode: str = "keep", train_on_all: bool = False) -> dict:
    """The report for records already read (a :class:`~edge_tune.data.formats.ReadResult`),
    with a tokenizer whose ``chat_template`` is the one training uses."""
    from edge_tune.data.preference import encode_pair
    from edge_tune.data.template import NO_TEMPLATE, RecordError, encode_examples

    if any(r.messages is not None for r in data.records) and not tok.chat_template:
        raise DataError(f"{NO_TEMPLATE}", setting="model", value=model)
    lengths, trained, kept, good, bad = [], [], [], [], []
    n = len(data.records)
    for i, record in enumerate(data.records):
        try:
            if record.rejected is not None:  # a preference pair trains two sequences
                pair = encode_pair(tok, record.messages, record.rejected, tools=record.tools,
                                   system_mode=system_mode, where=record.where)
                examples = [pair.chosen, pair.rejected]
            else:
                examples = encode_examples(tok, record.messages, record.text,
                                           tools=record.tools, train_on_all=train_on_all,
                                           system_mode=system_mode, where=record.where)
        except RecordError as exc:
            if not skip_invalid:
                raise
            bad.append((record.line, str(exc)))
            continue
        good.append(record)
        for ex in examples:
            lengths.append(len(ex.input_ids))
            trained.append(ex.n_trained)
            kept.append(sum(1 for x in ex.labels[:seq_len] if x != -100))
        if i % 50 == 0 or i == n - 1:
            on_event(Progress("tokenize", i + 1, n, "records", "tokenizing"))
    if not good:
        raise DataError(f"{path}: every record was invalid; first: {bad[0][1]}")

    report = {
        "path": path,
        "model": model,
        "format": data.format,
        "formats": dict(data.formats),
        "records": len(good),
        "examples": len(lengths),
        "skipped": len(data.skipped) + len(bad),
        "skipped_lines": [line for line, _ in list(data.skipped) + bad][:20],
        "tools": tool_counts(good),
        # every key: where each known one went, and the ones nothing reads
        "keys": data.keys_report(),
        # KTO records (label / kto_tag): desirable, undesirable
        "kto": dict(zip(("desirable", "undesirable"), data.kto)),
        # preference records (DPO/ORPO): each is a chosen and a rejected sequence
        "pairs": sum(1 for r in good if r.rejected is not None),
        **summarize(lengths, trained, seq_len, kept),
    }
    first = good[0]
    report["first_example"] = {"source": first.source, "line": first.line,
                               **_first_example(tok, first, seq_len, system_mode, train_on_all)}
    # Tool calling is what is most often mis-rendered: show the first record that uses it too.
    tooled = next((r for r in good if _uses_tools(r)), None)
    if tooled is not None and tooled is not first:
        report["first_tool_example"] = {
            "source": tooled.source, "line": tooled.line,
            **_first_example(tok, tooled, seq_len, system_mode, train_on_all)}
    return report


def _uses_tools(record) -> bool:
    return bool(record.tools) or any(m.get("tool_calls") or m["role"] == "tool"
                                     for m in record.messages or [])


__all__ = ["histogram", "inspect_data", "inspect_records", "length_stats", "merge_spans",
           "percentile", "summarize", "tool_counts"]
