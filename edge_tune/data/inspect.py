"""``edge-tune data inspect``: what a data file looks like to the trainer, before training.

:func:`inspect_data` reads the file exactly as ``train`` does, tokenizes every record with the
model's own tokenizer and chat template (the same :func:`~edge_tune.data.template.encode` the
trainer uses), and returns plain, JSON-safe data: the format, the record count, token-length
statistics and a histogram, the share of tokens that carry loss, how many examples ``--seq-len``
would cut, and the first example rendered with its trained character spans.

The statistics helpers (:func:`length_stats`, :func:`histogram`, :func:`merge_spans`) are pure.
transformers is imported inside :func:`inspect_data` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from edge_tune.errors import EdgeTuneError
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
    from edge_tune import models

    ref = models.resolve(model, on_event)
    try:
        from transformers import AutoTokenizer

        if ref.hub_id and ref.hf_dir is None:  # only the tokenizer files, not the weights
            on_event(Log(f"loading the tokenizer of {ref.hub_id} from the Hugging Face hub"))
            return AutoTokenizer.from_pretrained(ref.hub_id)
        return AutoTokenizer.from_pretrained(str(models.hf_dir_for(ref, on_event)))
    except EdgeTuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken directory, no network: one line for the user
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise EdgeTuneError(f"--model {model}: could not load its tokenizer "
                            f"({type(exc).__name__}: {first})", 3 if ref.hub_id else 2)


def _first_example(tok, record, seq_len: int) -> dict:
    """The first record as the model sees it: rendered text, trained character spans, and
    where ``seq_len`` cuts it (None when it fits)."""
    if record.messages is None:
        text = record.text
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        n = len(enc["input_ids"]) + (tok.eos_token_id is not None)
        cut = None
        if n > seq_len:
            offsets = enc["offset_mapping"]
            cut = offsets[seq_len - 1][1] if seq_len <= len(offsets) else len(text)
        return {"text": text, "spans": [[0, len(text)]] if text else [], "cut": cut}
    from edge_tune.data.template import assistant_spans, tokenize_spans

    text, spans = assistant_spans(tok, record.messages)
    # The very tokenization and labels encode() uses, so the highlight is what is trained.
    _, offsets, inside = tokenize_spans(tok, text, spans)
    trained = [span for span, flag in zip(offsets, inside) if flag]
    cut = offsets[seq_len - 1][1] if len(offsets) > seq_len else None
    return {"text": text, "spans": merge_spans(trained), "cut": cut}


def inspect_data(path, model: str = "default", seq_len: int = 512, fmt: str = "auto",
                 on_event: EventSink = ignore) -> dict:
    """Read and tokenize a data file as ``train`` would; returns a JSON-safe report (see the
    module docstring). Raises EdgeTuneError for bad data, a bad ``--model`` or ``--seq-len``."""
    from edge_tune import models
    from edge_tune.data.formats import read_records
    from edge_tune.data.template import encode_record

    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise EdgeTuneError(f"--seq-len {seq_len}: must be a whole number of tokens >= 1")
    models.check_spec(model)  # bad input fails fast, before any heavy work
    data = read_records(path, fmt=fmt)
    tok = _load_tokenizer(model, on_event)
    if any(r.messages is not None for r in data.records) and not tok.chat_template:
        raise EdgeTuneError(f"--model {model}: its tokenizer has no chat template, so "
                            "conversations cannot be rendered (use plain text data or a chat "
                            "model)")

    lengths, trained, kept = [], [], []
    n = len(data.records)
    for i, record in enumerate(data.records):
        ex = encode_record(tok, record.messages, record.text)
        lengths.append(len(ex.input_ids))
        trained.append(ex.n_trained)
        kept.append(sum(1 for x in ex.labels[:seq_len] if x != -100))
        if i % 50 == 0 or i == n - 1:
            on_event(Progress("tokenize", i + 1, n, "records", "tokenizing"))

    report = {
        "path": str(path),
        "model": model,
        "format": data.format,
        "formats": dict(data.formats),
        "records": n,
        "skipped": len(data.skipped),
        **summarize(lengths, trained, seq_len, kept),
    }
    first = data.records[0]
    report["first_example"] = {"source": first.source, "line": first.line,
                               **_first_example(tok, first, seq_len)}
    return report


__all__ = ["histogram", "inspect_data", "length_stats", "merge_spans", "percentile",
           "summarize"]
