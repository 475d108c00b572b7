"""Assistant reasoning (``reasoning_content``) in chat records: rendered, inlined or dropped.

Reasoning-distillation data carries the model's chain of thought beside its answer, on the
assistant message: ``reasoning_content`` is the name of the OpenAI-compatible APIs of
DeepSeek-R1 (https://api-docs.deepseek.com/guides/reasoning_model: "reasoning_content: the
content of the CoT, at the same level as content") and of Qwen3, whose chat template reads it
(Qwen3 model cards, https://huggingface.co/Qwen/Qwen3-8B, and its ``tokenizer_config.json``
``chat_template``: ``message.reasoning_content`` is written between ``<think>`` and
``</think>``). Some sets call it ``thinking`` (gpt-oss's Harmony messages, several Hugging
Face sets); :mod:`edge_tune.data.formats` reads that as ``reasoning_content``.

What happens to it, ``--reasoning`` (``TrainConfig.reasoning``), one of :data:`MODES`:

* ``auto``: the record goes to the chat template as it is; a template that renders reasoning
  (Qwen3's, the built-in ``qwen3``) trains it inside the turn, one that does not is refused
  for the record (``FILE:LINE``, :func:`edge_tune.data.template.render_examples`), never
  trained as a bare answer.
* ``inline``: written into the answer, ``MARK\\nREASONING\\nEND\\n\\nANSWER`` (the layout
  DeepSeek-R1 and Qwen3 generate), with the model's own think markers
  (:func:`think_markers`); any template then trains it.
* ``drop``: left out; the answers train without it.

Everything here is pure: lists of message dicts in, new lists out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Union

from edge_tune.errors import UsageError

KEY = "reasoning_content"
MODES = ("auto", "inline", "drop")
DEFAULT_MARKERS = ("<think>", "</think>")

# Think markers that models have as tokens of their own vocabulary, in the order they are
# looked for (the first pair whose two tokens are both in the vocabulary wins). Sources: each
# model's tokenizer.json / tokenizer_config.json added tokens and its chat template.
KNOWN_MARKERS: tuple[tuple[str, str, str], ...] = (
    ("<think>", "</think>", "DeepSeek-R1 and its distills, Qwen3, QwQ-32B (tokenizer added "
                            "tokens; deepseek-ai/DeepSeek-R1, Qwen/Qwen3-8B)"),
    ("[THINK]", "[/THINK]", "Magistral Small/Medium 2507 and later (control tokens of "
                            "mistralai/Magistral-Small-2507's tekken tokenizer)"),
    ("<seed:think>", "</seed:think>", "ByteDance Seed-OSS-36B-Instruct (tokenizer added "
                                      "tokens and chat template)"),
    ("◁think▷", "◁/think▷", "Kimi-VL-A3B-Thinking (moonshotai; chat template and tokens)"),
    ("<|begin_of_thought|>", "<|end_of_thought|>", "Sky-T1 / Bespoke-Stratos / OpenThoughts "
                                                   "data layout, when a tokenizer adds them"),
)


def check_mode(mode: str) -> str:
    """``mode`` when it is one of :data:`MODES`, else EdgeTuneError naming them."""
    if mode not in MODES:
        raise UsageError(f"expected one of {', '.join(MODES)}",
                         setting="reasoning", value=repr(mode))
    return mode


def _text(message: Mapping) -> str:
    value = message.get(KEY)
    return value if isinstance(value, str) else ""


def count(messages: list[dict]) -> int:
    """How many assistant messages carry non-empty ``reasoning_content``."""
    return sum(1 for m in messages if m.get("role") == "assistant" and _text(m).strip())


def apply(messages: list[dict], mode: str,
          markers: tuple[str, str] = DEFAULT_MARKERS) -> list[dict]:
    """``messages`` as ``mode`` trains them (see the module docstring); pure.

    * "auto": unchanged (the same list);
    * "inline": every assistant message with reasoning gets ``content`` =
      ``markers[0] + "\\n" + reasoning + "\\n" + markers[1] + "\\n\\n" + content`` (a ``None``
      content counts as ""), ``reasoning_content`` removed;
    * "drop": ``reasoning_content`` removed from every message.

    An empty or non-string ``reasoning_content`` is removed by "inline" and "drop" and adds
    nothing. Raises EdgeTuneError for an unknown mode."""
    check_mode(mode)
    if mode == "auto":
        return messages
    out = []
    for m in messages:
        if KEY not in m:
            out.append(m)
            continue
        kept = {k: v for k, v in m.items() if k != KEY}
        reasoning = _text(m).strip("\n")
        if mode == "inline" and m.get("role") == "assistant" and reasoning.strip():
            kept["content"] = (f"{markers[0]}\n{reasoning}\n{markers[1]}\n\n"
                               f"{m.get('content') or ''}")
        out.append(kept)
    return out


def _vocabulary(vocab) -> set[str]:
    if hasattr(vocab, "get_vocab"):  # a transformers tokenizer (added tokens included)
        return set(vocab.get_vocab())
    if isinstance(vocab, Mapping):
        return set(vocab)
    return set(vocab)


def think_markers(vocab: Union[object, Mapping, Iterable[str], None]) -> tuple[str, str]:
    """The think markers to inline reasoning with: the first pair of :data:`KNOWN_MARKERS`
    whose two strings are both tokens of ``vocab`` (a tokenizer with ``get_vocab()``, a
    token -> id mapping, or token strings), else :data:`DEFAULT_MARKERS` (``<think>`` /
    ``</think>``, the most common in reasoning data; written as text when the model has no
    such token)."""
    if vocab is None:
        return DEFAULT_MARKERS
    tokens = _vocabulary(vocab)
    for start, end, _source in KNOWN_MARKERS:
        if start in tokens and end in tokens:
            return start, end
    return DEFAULT_MARKERS
