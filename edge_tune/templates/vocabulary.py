"""Does a chat template fit a model's vocabulary? Checked before any model is loaded.

A template given with ``--chat-template`` marks turns with special tokens (ChatML's
``<|im_start|>``/``<|im_end|>``, Llama-3's ``<|eot_id|>``...). On a model whose vocabulary lacks
them the markers are trained as several text pieces and generation never meets a stop token, so
such a template is refused in one line. The markers are found by rendering a probe conversation
(with empty ``bos_token``/``eos_token``: those are the model's own by definition): every
``<|...|>`` marker, and the marker that closes the assistant turn (the text the engine takes
its turn-end stop token from, see ``edge_tune.llama.engine``). The vocabulary is read cheaply: a
GGUF's ``tokenizer.ggml.tokens`` array is searched in place (no Python list of the
vocabulary); an HF directory's ``tokenizer.json`` (its ``model.vocab`` and ``added_tokens``).
Pure module: no heavy imports.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Optional

from edge_tune.errors import DataError
from edge_tune.converters.formats.gguf_header import STRING, gguf_kv, gguf_skip, mapped

_PROBE = "\u2063edge-tune-probe\u2063"
_PIPE_MARKER = re.compile(r"<\|[^<>|\s]+\|>")
_TURN_END = re.compile(r"<\|[^<>|\s]+\|>|<[A-Za-z_/][^<>\s]*>")


def template_markers(text: str) -> list[str]:
    """The special-token markers template ``text`` writes around a user/assistant exchange: the
    one closing the assistant turn first, then the others in order (empty when the probe cannot be rendered: the template then speaks for itself)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        rendered = env.from_string(text).render(
            messages=[{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": _PROBE}],
            add_generation_prompt=False, bos_token="", eos_token="")
    except Exception:  # noqa: BLE001 - any failure: no markers to check, rendering reports it
        return []
    end = _TURN_END.match(rendered.partition(_PROBE)[2].lstrip())
    found = ([end.group(0)] if end else []) + _PIPE_MARKER.findall(rendered)
    return list(dict.fromkeys(found))


def gguf_has_tokens(path: Path, texts: list[str]) -> Optional[set[str]]:
    """Which of ``texts`` are whole entries of a GGUF's ``tokenizer.ggml.tokens`` (None when
    the file has no such array). Each entry is stored as a u64 length then its bytes, so a
    token is present when that exact byte string occurs in the array's span."""
    with mapped(Path(path)) as m:
        for key, kind, pos in gguf_kv(m):
            if key != "tokenizer.ggml.tokens":
                continue
            sub, = struct.unpack_from("<I", m, pos)
            if sub != STRING:
                return None
            end = gguf_skip(m, kind, pos)
            return {t for t in texts
                    if m.find(struct.pack("<Q", len(t.encode())) + t.encode(), pos, end) >= 0}
    return None

def hf_has_tokens(hf_dir: Path, texts: list[str]) -> Optional[set[str]]:
    """Which of ``texts`` are tokens of an HF directory's ``tokenizer.json`` (None without
    one, e.g. a SentencePiece-only tokenizer)."""
    try:
        data = json.loads((Path(hf_dir) / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = data.get("model", {}).get("vocab") or {}
        pieces = set(vocab) if isinstance(vocab, dict) else {v[0] for v in vocab}
        pieces |= {t.get("content") for t in data.get("added_tokens") or []}
    except (OSError, ValueError, AttributeError, TypeError, IndexError):
        return None
    return {t for t in texts if t in pieces}


# The built-in templates a model family ships with, by GGUF ``general.architecture`` or HF
# ``config.json`` ``model_type``: the first that fits the vocabulary is the family's own
# (llama-architecture models are Llama 3, SmolLM2 or Mistral: their tokens tell them apart).
FAMILY_TEMPLATES = {"llama": ("llama3", "smollm2", "mistral"), "mistral": ("mistral",),
                    "qwen2": ("qwen2",), "qwen3": ("qwen3",), "gemma2": ("gemma2",),
                    "gemma3": ("gemma",), "gemma3_text": ("gemma",), "gemma": ("gemma",),
                    "phi3": ("phi3",)}
# Turn markers the probe render cannot find (not of the <|...|> form, or the eos token):
# Mistral's [INST] ... [/INST] are control tokens of its vocabulary.
EXTRA_MARKERS = {"mistral": ["[INST]", "[/INST]"]}


def _family(ref) -> tuple[str, ...]:
    """``ref``'s family key candidates (see FAMILY_TEMPLATES), read from a header or a
    config file; () when unknown."""
    if ref.gguf is not None:
        from edge_tune.converters.formats.gguf_header import gguf_metadata

        meta = gguf_metadata(ref.gguf, {"general.architecture", "tokenizer.ggml.pre"})
        if meta.get("tokenizer.ggml.pre") == "smollm":
            return ("smollm2",)
        return FAMILY_TEMPLATES.get(str(meta.get("general.architecture")), ())
    if ref.hf_dir is not None:
        try:
            config = json.loads((Path(ref.hf_dir) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return ()
        return FAMILY_TEMPLATES.get(str(config.get("model_type")) if isinstance(config, dict)
                                    else "", ())
    return ()


def _vocab_has(ref, texts: list[str]) -> Optional[set[str]]:
    if ref.gguf is not None:
        return gguf_has_tokens(ref.gguf, texts)
    if ref.hf_dir is not None:
        return hf_has_tokens(ref.hf_dir, texts)
    return None


def fitting_templates(ref) -> Optional[list[str]]:
    """The built-in template names (:data:`edge_tune.templates.builtin.BUILTIN`) whose turn markers
    are all single tokens of ``ref``'s vocabulary (a resolved
    :class:`edge_tune.models.ModelRef`), the model family's own first, then in built-in
    order; [] when none fits; None when the vocabulary cannot be read without a download
    or a load (a hub ID). E.g. a Gemma base GGUF: ["gemma2", "gemma"] (never "chatml": it
    has no ``<|im_start|>``). Reads the GGUF header or the HF directory's files only."""
    from edge_tune.templates.builtin import BUILTIN

    markers = {name: template_markers(text) + EXTRA_MARKERS.get(name, [])
               for name, text in BUILTIN.items()}
    present = _vocab_has(ref, list(dict.fromkeys(t for ms in markers.values() for t in ms)))
    if present is None:
        return None
    fits = [name for name, ms in markers.items() if ms and all(t in present for t in ms)]
    own = next((name for name in _family(ref) if name in fits), None)
    return ([own] if own else []) + [name for name in fits if name != own]


def require_template_tokens(chosen, ref) -> None:
    """Refuse ``--chat-template`` (``chosen``, a :class:`edge_tune.templates.choice.ChatTemplate`)
    when a marker it writes is not a single token of ``--model`` (``ref``, a resolved
    :class:`edge_tune.models.ModelRef`); EdgeTuneError names the marker and the built-ins that
    fit. Nothing is checked when the vocabulary cannot be read without a download or load."""
    if chosen is None or chosen.source != "--chat-template":
        return
    markers = template_markers(chosen.text)
    if not markers:
        return
    def has(texts: list[str]) -> Optional[set[str]]:
        if ref.gguf is not None:
            return gguf_has_tokens(ref.gguf, texts)
        if ref.hf_dir is not None:
            return hf_has_tokens(ref.hf_dir, texts)
        return None
    from edge_tune.templates.builtin import BUILTIN

    candidates = {name: template_markers(text) for name, text in BUILTIN.items()}
    present = has(list(dict.fromkeys(markers + [t for ms in candidates.values() for t in ms])))
    if present is None:
        return
    missing = [t for t in markers if t not in present]
    if not missing:
        return
    fitting = fitting_templates(ref) or []  # the family's own first
    hint = (f"use one whose markers it has: {', '.join(fitting)}" if fitting
            else "no built-in fits; give a Jinja file using this model's own special tokens")
    name = chosen.name or "FILE"
    raise DataError(f"{missing[0]!r} is not a token of the "
                    f"vocabulary of {ref.spec} (the template's turn markers would be "
                    f"trained or read as text, and generation would not stop; {hint})",
                    setting="chat_template", value=name)
