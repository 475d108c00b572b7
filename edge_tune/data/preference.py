"""Preference records (a prompt, a chosen and a rejected answer) for DPO and ORPO training.

Two shapes, detected like the SFT formats in :mod:`edge_tune.data.formats`:

* ``preference`` — TRL's preference format (https://huggingface.co/docs/trl/dataset_formats):
  ``{"prompt": ..., "chosen": ..., "rejected": ...}`` where each value is text (the prompt is
  then one user turn, each answer one assistant turn) or a list of chat messages
  (conversational). Without ``prompt`` (TRL's "implicit prompt"), ``chosen`` and ``rejected``
  are whole conversations and their shared leading messages are the prompt.
* ``openai_preference`` — OpenAI's preference fine-tuning format
  (https://platform.openai.com/docs/guides/direct-preference-optimization):
  ``{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", ...}],
  "non_preferred_output": [...]}``.

Both become a pair of conversations, ``prompt + chosen`` and ``prompt + rejected``, sharing the
prompt. Assistant turns inside the prompt are context (``weight: 0``): only the answers carry
the loss. Pure; errors are one line ``FILE:LINE: what is wrong (expected)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from edge_tune.data.readers import json_kind
from edge_tune.data.template import IGNORE, Example, encode_examples
from edge_tune.errors import DataError, UsageError

PREFERENCE_FORMATS = ("preference", "openai_preference")
SHAPES = {
    "preference": '{"prompt": ..., "chosen": ..., "rejected": ...} (text or message lists)',
    "openai_preference": '{"input": {"messages": [...]}, "preferred_output": [{"role": '
                         '"assistant", ...}], "non_preferred_output": [...]}',
}
LABELS = {"preference": "preference (prompt/chosen/rejected)",
          "openai_preference": "OpenAI preference"}
SIGNATURES = {"openai_preference": ("preferred_output", "non_preferred_output"),
              "preference": ("chosen", "rejected")}

Pair = tuple[list[dict], list[dict]]  # (prompt + chosen, prompt + rejected) messages


def _messages(value, key: str, where: str, fmt: str, check: Callable) -> list[dict]:
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else json_kind(value)
        raise DataError(f"{where}: {key!r} must be text or a non-empty list of messages, "
                        f"got {got} (expected {SHAPES[fmt]})")
    return [check(m, f"{where}: {key}[{i}]") for i, m in enumerate(value)]


def _side(obj: dict, key: str, where: str, fmt: str, role: str, check: Callable) -> list[dict]:
    """One value as messages: a string is one ``role`` turn, a list is checked messages."""
    if key not in obj or obj[key] is None:
        raise DataError(f"{where}: missing field {key!r} (expected {SHAPES[fmt]})")
    value = obj[key]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: {key!r} is empty")
        return [{"role": role, "content": value}]
    return _messages(value, key, where, fmt, check)


def _answer(turns: list[dict], key: str, where: str, fmt: str) -> list[dict]:
    if turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: {key!r} must end with an assistant message (got "
                        f"{turns[-1]['role']}; expected {SHAPES[fmt]})")
    return turns


def _context(prompt: list[dict]) -> list[dict]:
    # Earlier assistant turns are the conversation so far, not the answer being compared.
    return [{**m, "weight": 0} if m["role"] == "assistant" else m for m in prompt]


def _pair(prompt: list[dict], chosen: list[dict], rejected: list[dict], where: str) -> Pair:
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same answer (expected "
                        "two different answers to compare)")
    prompt = _context(prompt)
    return prompt + chosen, prompt + rejected


def trl_pair(obj: dict, where: str, check: Callable) -> Pair:
    """A TRL preference record as (prompt + chosen, prompt + rejected) messages; ``check``
    validates one chat message (``formats._openai_message``).

    The prompt, as TRL's ``maybe_extract_prompt`` finds it: without ``prompt`` the leading
    messages both conversations share. With ``prompt`` *and* whole conversations in
    ``chosen``/``rejected`` (HuggingFaceH4/ultrafeedback_binarized), the shared start is the
    prompt and ``prompt`` must repeat it (its last user turn, or the messages themselves):
    rendered once. A ``prompt`` that disagrees with the conversations is an error, as is a
    ``messages`` copy that is not the chosen conversation, or two conversations that start
    differently."""
    fmt = "preference"
    chosen = _answer(_side(obj, "chosen", where, fmt, "assistant", check), "chosen", where, fmt)
    rejected = _answer(_side(obj, "rejected", where, fmt, "assistant", check), "rejected",
                       where, fmt)
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    shared = chosen[:n]
    if obj.get("prompt") is not None:
        prompt = _side(obj, "prompt", where, fmt, "user", check)
        if shared and not _repeats(prompt, shared):
            raise DataError(f"{where}: 'prompt' is not the conversation 'chosen' and "
                            f"'rejected' start with (prompt {_text_of(prompt)}, "
                            f"conversations start {_text_of(shared)}; expected the same "
                            "prompt, or only the answers in chosen/rejected)")
        prompt = shared or prompt
    elif shared:
        prompt = shared
    else:
        raise DataError(f"{where}: missing field 'prompt' (and 'chosen' and 'rejected' "
                        f"share no leading messages to take it from; expected {SHAPES[fmt]})")
    good, bad = chosen[n:], rejected[n:]
    for key, answer in (("chosen", good), ("rejected", bad)):
        if any(m["role"] in ("user", "system") for m in answer):
            raise DataError(f"{where}: 'chosen' and 'rejected' start with different "
                            f"conversations ({key} holds a {answer[0]['role']} turn after "
                            "the shared prompt; expected one prompt and two answers)")
    messages = obj.get("messages")
    if messages is not None and (not isinstance(messages, list) or [
            check(m, f"{where}: messages[{i}]") for i, m in enumerate(messages)] != chosen):
        raise DataError(f"{where}: 'messages' is not the chosen conversation (a preference "
                        "record may carry a copy of it, as ultrafeedback_binarized does; "
                        "anything else is ambiguous: remove it)")
    system = obj.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise DataError(f"{where}: 'system' must be a string, got {json_kind(system)}")
        if prompt[0]["role"] == "system" and prompt[0]["content"] != system:
            raise DataError(f"{where}: 'system' and the prompt's own system message differ "
                            "(expected one system prompt per record)")
        if prompt[0]["role"] != "system" and system.strip():
            prompt = [{"role": "system", "content": system}] + prompt
    return _pair(prompt, good, bad, where)


def _repeats(prompt: list[dict], shared: list[dict]) -> bool:
    """Does ``prompt`` say again what the shared conversation start says: the same messages,
    their start or end, or (one text prompt) the text of its last user turn?"""
    def same(a: list[dict], b: list[dict]) -> bool:
        return [(m["role"], (m.get("content") or "").strip()) for m in a] == \
            [(m["role"], (m.get("content") or "").strip()) for m in b]

    k = len(prompt)
    return same(prompt, shared[:k]) or same(prompt, shared[-k:]) or (
        k == 1 and prompt[0]["role"] == "user"
        and same(prompt, [m for m in shared if m["role"] == "user"][-1:]))


def _text_of(messages: list[dict], limit: int = 40) -> str:
    text = " / ".join(str(m.get("content") or "") for m in messages)
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")


def openai_pair(obj: dict, where: str, check: Callable) -> Pair:
    """An OpenAI preference record as (prompt + chosen, prompt + rejected) messages."""
    fmt = "openai_preference"
    box = obj.get("input")
    if not isinstance(box, dict) or "messages" not in box:
        raise DataError(f"{where}: 'input' must be an object with 'messages' (got "
                        f"{json_kind(box)}; expected {SHAPES[fmt]})")
    prompt = _messages(box["messages"], "input.messages", where, fmt, check)
    chosen = _answer(_messages(obj.get("preferred_output"), "preferred_output", where, fmt,
                               check), "preferred_output", where, fmt)
    rejected = _answer(_messages(obj.get("non_preferred_output"), "non_preferred_output",
                                 where, fmt, check), "non_preferred_output", where, fmt)
    return _pair(prompt, chosen, rejected, where)


NORMALISERS = {"preference": trl_pair, "openai_preference": openai_pair}  # + a message check


def check_method(method: str, data_format: str, path: str) -> None:
    """One line when the data does not fit the training method: DPO/ORPO need preference
    records, SFT needs the other formats."""
    wants_pairs = method in ("dpo", "orpo")
    if data_format == "mixed":
        return  # a directory: each record is checked when it is tokenized
    if wants_pairs and data_format not in PREFERENCE_FORMATS:
        raise UsageError(f"{path}: --method {method} needs preference data, got "
                            f"{data_format} records (expected {SHAPES['preference']} or "
                            f"{SHAPES['openai_preference']})")
    if method == "kto" and data_format in PREFERENCE_FORMATS:
        raise UsageError(f"{path}: --method kto trains on unpaired answers marked good or bad "
                         f"('label' / 'kto_tag'), got {LABELS[data_format]} pairs (train them "
                         "with --method dpo or --method orpo)")
    if not wants_pairs and data_format in PREFERENCE_FORMATS:
        raise UsageError(f"{path}: this is preference data ({LABELS[data_format]}); train "
                            "it with --method dpo or --method orpo (expected chat or text "
                            "records for --method sft)")


def unpaired(records: list, method: str, desirable_only: bool, path: str) -> tuple[list, int]:
    """KTO data (records with TRL's ``label`` / LLaMA-Factory's ``kto_tag``) under a method
    that has no use for labels: refused in one line (sft would train the undesirable answers
    as good ones), or with ``desirable_only`` only the desirable records, returned with the
    count of undesirable ones left out. Other data passes unchanged: ``(records, 0)``."""
    labelled = [r for r in records if r.label is not None]
    if method == "kto":
        # pairs are refused by check_method, which names what trains them
        unlabelled = next((r for r in records if r.label is None and r.rejected is None), None)
        if unlabelled is not None:
            raise UsageError(f"{unlabelled.where or path}: --method kto needs every record "
                             "marked desirable or not ('label' or 'kto_tag': true or false); "
                             "this one has neither")
        return records, 0
    if not labelled:
        if desirable_only:
            raise UsageError(f"{path}: --desirable-only: this data has no KTO labels ('label' "
                             "or 'kto_tag'); drop the flag")
        return records, 0
    bad = [r for r in labelled if r.label is False]
    if method != "sft":
        raise UsageError(f"{labelled[0].where or path}: --method {method} needs chosen/rejected "
                         "pairs; this is KTO data (unpaired answers marked desirable or not by "
                         "'label'/'kto_tag'), which pairs nothing: train it with --method kto")
    if not desirable_only:
        first = bad[0] if bad else labelled[0]
        raise UsageError(
            f"{first.where or path}: KTO data ({len(labelled) - len(bad)} desirable, {len(bad)} "
            f"undesirable answers, marked by 'label'/'kto_tag'): --method {method} has no use "
            "for the labels and would train every answer as a good one; add --desirable-only "
            "to train only the desirable answers, or train on both with --method kto")
    kept = [r for r in records if r.label is not False]
    if not kept:
        raise UsageError(f"{path}: --desirable-only: every one of the {len(bad)} KTO records "
                         "is undesirable (label false): nothing to train")
    return kept, len(bad)


@dataclass
class PairExample(Example):
    """A tokenized preference pair: ``input_ids``/``labels`` are prompt + chosen answer,
    ``rejected_*`` prompt + rejected answer; labels on the answer tokens only."""
    rejected_ids: list[int] = field(default_factory=list)
    rejected_labels: list[int] = field(default_factory=list)

    @property
    def n_trained(self) -> int:
        """Trained tokens of the side with fewer: a pair needs both answers."""
        return min(Example.n_trained.fget(self), self.rejected.n_trained)

    @property
    def rejected(self) -> Example:
        return Example(self.rejected_ids, self.rejected_labels)

    @property
    def chosen(self) -> Example:
        return Example(self.input_ids, self.labels)

    @property
    def longest(self) -> int:
        return max(len(self.input_ids), len(self.rejected_ids))

    def cut(self, seq_len: int) -> PairExample:
        return PairExample(self.input_ids[:seq_len], self.labels[:seq_len],
                           self.rejected_ids[:seq_len], self.rejected_labels[:seq_len])


def encode_pair(tokenizer, chosen: list[dict], rejected: list[dict],
                tools: Optional[list[dict]] = None, **kw) -> PairExample:
    """Both conversations of a pair rendered with the chat template and tokenized exactly as
    SFT examples are (:func:`~edge_tune.data.template.encode_examples`: the answer's tokens,
    end of turn included, carry the labels). ``kw``: ``system_mode``, ``where``."""
    good = encode_examples(tokenizer, chosen, tools=tools, **kw)[-1]
    bad = encode_examples(tokenizer, rejected, tools=tools, **kw)[-1]
    return PairExample(good.input_ids, good.labels, bad.input_ids, bad.labels)


@dataclass
class KTOExample(Example):
    """A tokenized KTO record (Ethayarajh et al. 2024; TRL's unpaired preference format):
    ``input_ids``/``labels`` the prompt and its one answer, labels on the answer tokens only;
    ``desirable`` its label (TRL's ``label``, LLaMA-Factory's ``kto_tag``); the first
    ``prompt_len`` tokens are the prompt."""
    desirable: bool = True
    prompt_len: int = 0

    @property
    def longest(self) -> int:
        return len(self.input_ids)

    def cut(self, seq_len: int) -> KTOExample:
        return KTOExample(self.input_ids[:seq_len], self.labels[:seq_len], self.desirable,
                          min(self.prompt_len, seq_len))


def kto_messages(messages: list[dict]) -> list[dict]:
    """A KTO record's conversation with only its answer trained: the messages after the last
    user turn are the answer (TRL's completion); assistant turns before it are context
    (``weight: 0``), as in a preference pair's prompt."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    return _context(messages[:last_user + 1]) + messages[last_user + 1:]


def encode_kto(tokenizer, messages: list[dict], desirable: bool,
               tools: Optional[list[dict]] = None, **kw) -> KTOExample:
    """A KTO record rendered and tokenized as an SFT example of :func:`kto_messages` (the
    answer's tokens, end of turn included, carry the labels). ``kw``: ``system_mode``,
    ``where``."""
    ex = encode_examples(tokenizer, kto_messages(messages), tools=tools, **kw)[-1]
    start = next((i for i, t in enumerate(ex.labels) if t != IGNORE), len(ex.labels))
    return KTOExample(ex.input_ids, ex.labels, desirable, start)


def kto_rows(batch: list[KTOExample], limit: Optional[int] = None) -> list[Example]:
    """The rows one KTO batch computes (n examples): the n examples as they are, then n KL
    rows, each example's prompt followed by the answer of the example before it in the batch
    (the first takes the last one's): TRL's mismatched pairs for the KL estimate
    (``KTOTrainer``: ``KL_completion_ids = [completion_ids[-1]] + completion_ids[:-1]``), cut
    to ``limit`` tokens. A batch of one pairs an example with itself."""
    rows: list[Example] = [Example(e.input_ids, e.labels) for e in batch]
    for i, e in enumerate(batch):
        other = batch[i - 1]
        ids = e.input_ids[:e.prompt_len] + other.input_ids[other.prompt_len:]
        labels = [IGNORE] * e.prompt_len + other.labels[other.prompt_len:]
        rows.append(Example(ids[:limit], labels[:limit]))
    return rows
