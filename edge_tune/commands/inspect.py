"""``data inspect`` and the TUI's data checks: what the trainer will see, which chat template
a model brings, which records are invalid."""

from __future__ import annotations

from typing import Optional

from edge_tune import models
from edge_tune.data.formats import read_records
from edge_tune.errors import EdgeTuneError
from edge_tune.events import EventSink, Log, ignore
from edge_tune.templates import choice as template_choice
from edge_tune.templates.choice import system_mode_option


def inspect_data(path, model: str = "default", seq_len: int = 512, fmt: str = "auto",
                 on_event: EventSink = ignore, chat_template: Optional[str] = None,
                 system_mode: Optional[str] = None, reasoning: Optional[str] = None) -> dict:
    """``edge-tune data inspect``'s report (see :mod:`edge_tune.data.inspect`). Conversations
    on a model with no chat template and no ``chat_template`` are refused before the model's
    tokenizer is loaded (for a GGUF that is a dequantized copy of the whole model).
    ``reasoning``: ``--reasoning auto|inline|drop`` (:mod:`edge_tune.data.reasoning`; None:
    auto); a bad value is an EdgeTuneError before anything is read."""
    from edge_tune.data import reasoning as reasoning_mod
    from edge_tune.data.inspect import inspect_data as _inspect

    models.check_spec(model)
    _say_parts(path, on_event)
    extra = {} if reasoning is None else {"reasoning": reasoning_mod.check_mode(reasoning)}
    chosen = template_choice.given(chat_template)
    records = []  # a given template needs no records: only its tokens are checked
    if chosen is None:
        try:
            records = read_records(path, fmt=fmt, skip_invalid=True).records
        except EdgeTuneError:
            pass  # no valid record at all: the report's own reading says which line
    template_choice.require_for_conversations(records, models.resolve(model, on_event), chosen)
    return _inspect(path, model=model, seq_len=seq_len, fmt=fmt, on_event=on_event,
                    template=chosen.text if chosen is not None else None,
                    system_mode=system_mode_option(system_mode) or "keep", **extra)


def _say_parts(path, on_event: EventSink) -> None:
    """What each part of a folder or saved dataset is for, and what --max-samples cuts, as
    ``train`` says it (inspect reads the training part only)."""
    from pathlib import Path

    from edge_tune.data.layouts import data_spec, say_parts
    from edge_tune.data.readers import source_parts

    spec = data_spec(str(path)) if isinstance(path, (str, Path)) else path
    parts = source_parts(spec)
    if len(parts) > 1 or any(p.named for p in parts):
        say_parts(parts, on_event)
    if getattr(spec, "max_samples", None) is not None:
        on_event(Log(f"--max-samples {spec.max_samples}: only the first {spec.max_samples} "
                     "records of each source are read"))


def model_template(model: str) -> dict:
    """Whether ``--model`` brings its own chat template, read from the GGUF header or the HF
    directory's files (no model load): ``{"known", "has", "name", "builtin", "fitting"}``;
    ``known`` is False for a hub ID not on disk. ``name``: the built-in name it equals, if
    any. ``fitting``: for a model without one, the built-in names whose turn markers are
    tokens of its vocabulary, its family's own first
    (:func:`edge_tune.templates.vocabulary.fitting_templates`; None when unknown or not needed)."""
    from edge_tune.templates.vocabulary import fitting_templates

    ref = models.resolve(model)
    known, text = template_choice.model_chat_template(ref)
    found = template_choice.of_text(text, "model")
    return {"known": known, "has": found is not None, "name": found.name if found else None,
            "builtin": template_choice.builtin_names(),
            "fitting": fitting_templates(ref) if known and found is None else None}


def bad_records(path, fmt: str = "auto") -> list[dict]:
    """Every invalid record of a data file, ``[{"line", "message"}]`` (``train`` stops at the
    first one; ``--skip-invalid`` skips them all)."""
    try:
        result = read_records(path, fmt=fmt, skip_invalid=True)
    except EdgeTuneError as exc:  # nothing valid at all: the error names the first bad one
        return [{"line": None, "message": str(exc)}]
    return [{"line": line, "message": message} for line, message in result.skipped]
