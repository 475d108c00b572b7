"""Which chat template a command uses, and reading a model's own template cheaply.

Order, for every command that renders a conversation: ``--chat-template NAME|FILE`` (see
:mod:`edge_tune.templates.builtin`), else the template the run was trained with (its manifest),
else the model's own (GGUF ``tokenizer.chat_template``, or an HF directory's ``tokenizer_config.json`` /
``chat_template.jinja``), else none. Without one, conversations cannot be trained on (refused
before any model is loaded) and ``chat`` answers as a plain text completion.

Reading the template must not cost a model load: a GGUF's key-value header is scanned in place
(:mod:`edge_tune.converters.formats.gguf_header`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edge_tune.errors import DataError, UsageError
from edge_tune.converters.formats.gguf_header import gguf_metadata

OPTION = "--chat-template NAME|FILE"


@dataclass(frozen=True)
class ChatTemplate:
    """A chosen template: its Jinja ``text``, its built-in ``name`` when it is one, and where
    it came from (``source``: "--chat-template", "run" or "model")."""

    text: str
    name: Optional[str]
    source: str


def builtin_names() -> str:
    from edge_tune.templates.builtin import BUILTIN

    return ", ".join(BUILTIN)


def no_template_hint(ref=None) -> str:
    """The one phrase every "this model has no chat template" message ends with. With ``ref``
    (a resolved :class:`edge_tune.models.ModelRef` whose vocabulary can be read) it names only
    the built-ins whose turn markers are tokens of that model, its family's own first
    (:func:`edge_tune.templates.vocabulary.fitting_templates`): never ChatML for a Gemma."""
    if ref is not None:
        from edge_tune.templates.vocabulary import fitting_templates

        fits = fitting_templates(ref)
        if fits:
            return f"give {OPTION} (built-ins that fit its vocabulary: {', '.join(fits)}; or " \
                   "a Jinja file)"
        if fits is not None:
            return f"give {OPTION} with a Jinja file (no built-in fits its vocabulary)"
    return f"give {OPTION} (built-in: {builtin_names()}; or a Jinja file)"


def system_mode_option(value: Optional[str]) -> Optional[str]:
    """``--system-mode``: None (not given), "keep" or "fold"; anything else is EdgeTuneError."""
    if value is not None and value not in ("keep", "fold"):
        raise UsageError("expected keep (the system message as "
                         "the template renders it) or fold (into the first user turn)",
                         setting="system_mode", value=repr(value))
    return value


def given(spec: Optional[str]) -> Optional[ChatTemplate]:
    """``--chat-template SPEC`` resolved (None when not given); one-line error for a bad one."""
    if spec is None or spec == "":
        return None
    from edge_tune.templates.builtin import resolve_template, template_name

    text = resolve_template(spec)
    return ChatTemplate(text, template_name(text), "--chat-template")


def of_text(text: Optional[str], source: str) -> Optional[ChatTemplate]:
    if not text:
        return None
    from edge_tune.templates.builtin import template_name

    return ChatTemplate(text, template_name(text), source)


def choose(spec: Optional[str], manifest) -> Optional[ChatTemplate]:
    """The flag's template, else the run's (its manifest), else None: the model's own (read
    by whoever loads the model). ``manifest``: the run's :class:`~edge_tune.manifest.Manifest`
    or None."""
    flag = given(spec)
    if flag is not None:
        return flag
    return of_text(manifest.chat_template if manifest is not None else None, "run")


# --- the model's own template, read cheaply ----------------------------------------------------

def gguf_chat_template(path: Path) -> Optional[str]:
    """A GGUF's ``tokenizer.chat_template`` (None when it has none)."""
    return gguf_metadata(path, {"tokenizer.chat_template"}).get("tokenizer.chat_template") or None


def hf_chat_template(hf_dir: Path) -> Optional[str]:
    """An HF model directory's chat template, where transformers looks for it:
    ``chat_template.jinja`` (transformers >= 4.43 saves it there), else
    ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates of
    which "default" is used)."""
    hf_dir = Path(hf_dir)
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8") or None
    try:
        config = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(value, list):
        value = next((t.get("template") for t in value
                      if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) and value else None


def model_chat_template(ref) -> tuple[bool, Optional[str]]:
    """(known, template) of a resolved ``--model`` (a :class:`edge_tune.models.ModelRef`):
    known is False for a hub ID not on disk yet, whose files are fetched only when training
    starts."""
    if ref.gguf is not None:
        return True, gguf_chat_template(ref.gguf)
    if ref.hf_dir is not None:
        return True, hf_chat_template(ref.hf_dir)
    return False, None


def require_for_conversations(records, ref, chosen: Optional[ChatTemplate]) -> None:
    """Refuse conversation data on a model with no chat template when none is given, before
    any model is loaded; refuse a given template whose turn markers are not tokens of the
    model (:func:`edge_tune.templates.vocabulary.require_template_tokens`). ``records``: objects or
    dicts with ``messages`` (None for text)."""
    if chosen is not None:
        from edge_tune.templates.vocabulary import require_template_tokens

        require_template_tokens(chosen, ref)
        return
    def has_messages(r) -> bool:
        return (r.get("messages") if isinstance(r, dict) else getattr(r, "messages", None)) \
            is not None
    if not any(has_messages(r) for r in records):
        return  # plain text (continued pre-training) needs no template
    known, template = model_chat_template(ref)
    if known and not template:
        raise DataError("this model has no chat template, and the data "
                        f"holds conversations; {no_template_hint(ref)}",
                        setting="model", value=ref.spec)
