"""Render conversations with the model's own chat template and find the assistant tokens.

The trained spans are derived from the template itself, never from hand-typed role markers:
for each assistant message we render the conversation up to it with the generation prompt
(where its text starts) and up to and including it (where its turn ends, end-of-turn token
included). Token offsets then say which tokens fall inside those character spans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from edge_tune.errors import EdgeTuneError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of every assistant turn."""
    render = lambda msgs, gen: tokenizer.apply_chat_template(  # noqa: E731
        msgs, tokenize=False, add_generation_prompt=gen)
    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        if not (full.startswith(before) and full.startswith(upto) and len(upto) > len(before)):
            raise EdgeTuneError("the model's chat template does not render conversations "
                                "incrementally; cannot locate assistant turns")
        spans.append((len(before), len(upto)))
    return full, spans


def encode_text(tokenizer, text: str, seq_len: Optional[int] = None) -> Example:
    """Plain text for continued pre-training: loss on every token, EOS appended."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return Example(ids[:seq_len], list(ids[:seq_len]))


def encode(tokenizer, messages: list[dict], seq_len: Optional[int] = None,
           train_on_all: bool = False) -> Example:
    """Token ids and labels of one conversation, cut to ``seq_len`` tokens when given."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tok, (s, e) in zip(ids, offsets):
        inside = train_on_all or any(s < b and e > a for a, b in spans)
        labels.append(tok if inside else IGNORE)
    return Example(ids[:seq_len], labels[:seq_len])
