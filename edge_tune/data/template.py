"""Render conversations with the model's own chat template and find the assistant tokens.

The trained spans are derived from the template itself, never from hand-typed role markers:
for each assistant message we render the conversation up to it with the generation prompt
(where its text starts) and up to and including it (where its turn ends, end-of-turn token
included). Token offsets then say which tokens fall inside those character spans; a token
that would straddle a span edge is split there (see ``tokenize_spans``).
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


def tokenize_spans(tokenizer, text: str, spans: list[tuple[int, int]]
                   ) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
    """Token ids and character offsets of ``text``, and whether each token is inside a span.

    Every span edge is a token edge. BPE can merge characters across an edge: ChatML does not
    trim, so the header's "\n" and an answer's leading "  " or "\n" become one byte-level token
    ("\n " / "\n\n"); a tokenizer without a pre-tokenizer (Gemma's kind) can merge "\n" with
    the first letters. Labelling such a token trains a piece of the role header, leaving it out
    drops the answer's first characters, and the model never sees it at inference, where the
    prompt ends at the edge. So the text before the edge is tokenized as it is on its own (the
    inference prompt) and the rest of the merged token on its own.
    """
    ids, offsets = _tokenize(tokenizer, text, 0)
    added = set(getattr(tokenizer, "added_tokens_decoder", {}))  # never split these
    done = 0  # tokens before this index are final
    for x in sorted({x for span in spans for x in span}):
        i = next((t for t in range(done, len(ids)) if offsets[t][1] > x), len(ids))
        if i == len(ids) or offsets[i][0] >= x:
            done = i
            continue
        s, j, e = offsets[i][0], i, x
        while j < len(ids) and offsets[j][0] < x:  # byte-level tokens can share a character
            e = max(e, offsets[j][1])
            j += 1
        if added.intersection(ids[i:j]):
            done = j
            continue
        left_ids, left_offsets = _tokenize(tokenizer, text[:x], 0)
        k = 0
        while k < i and k < len(left_ids) and (left_ids[k], left_offsets[k]) == (ids[k],
                                                                                  offsets[k]):
            k += 1
        if k < done:  # would undo an earlier edge: take only the merged token's characters
            k = i
            left_ids, left_offsets = _tokenize(tokenizer, text[s:x], s)
        else:
            left_ids, left_offsets = left_ids[k:], left_offsets[k:]
        right_ids, right_offsets = _tokenize(tokenizer, text[x:e], x)
        new_ids = left_ids + right_ids
        # Keep the merged token when the pieces do not spell the same token strings (say, a
        # tokenizer that puts a space before every call's text): it is trained if any of it
        # is inside a span.
        if "".join(tokenizer.convert_ids_to_tokens(new_ids)) != "".join(
                tokenizer.convert_ids_to_tokens(ids[k:j])):
            done = j
            continue
        ids[k:j], offsets[k:j] = new_ids, left_offsets + right_offsets
        done = k + len(left_ids)  # the right piece may reach over the next edge
    inside = [any(s < b and e > a for a, b in spans) for s, e in offsets]
    return ids, offsets, inside


def _tokenize(tokenizer, text: str, shift: int) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [(shift + a, shift + b) for a, b in enc["offset_mapping"]]


def encode_record(tokenizer, messages: Optional[list[dict]], text: Optional[str],
                  train_on_all: bool = False) -> Example:
    """Either kind of record: a conversation (chat template, assistant masks) or plain text
    (every token trained)."""
    if messages is None:
        return encode_text(tokenizer, text or "")
    return encode(tokenizer, messages, train_on_all=train_on_all)


def encode(tokenizer, messages: list[dict], seq_len: Optional[int] = None,
           train_on_all: bool = False) -> Example:
    """Token ids and labels of one conversation, cut to ``seq_len`` tokens when given."""
    text, spans = assistant_spans(tokenizer, messages)
    ids, _, inside = tokenize_spans(tokenizer, text, spans)
    labels = [tok if train_on_all or keep else IGNORE for tok, keep in zip(ids, inside)]
    return Example(ids[:seq_len], labels[:seq_len])
