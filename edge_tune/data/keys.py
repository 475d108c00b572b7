"""Which keys each record format understands, and where each goes: the rule that every key of
a record is either used or named.

For every format :mod:`edge_tune.data.formats` reads there is a table of the record-level keys
it understands (with the ecosystem's additions: OpenAI's fine-tuning fields, ShareGPT's and
LLaMA-Factory's ``system``/``tools``, Alpaca's ``history``, TRL's ``label``) and of the keys of
one message. A key in no table is *ignored*, and ignored keys are counted per record and shown
as one summary line by ``data inspect`` and ``train`` and in the run's manifest (``ignored
keys: id (200 records), source (200)``). A key with a meaning edge-tune knows but cannot honour
(``images``, a key of another format with a different value) is a ``FILE:LINE`` error that says
what would honour it. ``null`` means absent everywhere (:func:`drop_nulls`): Arrow, Parquet and
HF ``datasets`` fill keys a record does not have with null.

Sources of the tables: OpenAI's chat fine-tuning format
(https://platform.openai.com/docs/guides/supervised-fine-tuning, ``weight``, ``tools``,
``parallel_tool_calls``) and preference format
(https://platform.openai.com/docs/guides/direct-preference-optimization); TRL's dataset
formats (https://huggingface.co/docs/trl/dataset_formats: ``prompt``, ``completion``,
``chosen``, ``rejected``, ``label``, ``tools``); LLaMA-Factory's data/README.md (Alpaca
``system``/``history``/``kto_tag``, ShareGPT ``system``/``tools`` and its ``function_call``/
``observation`` turns). Pure.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

# format -> record key -> where it goes (shown by `data inspect`)
RECORD_KEYS: dict[str, dict[str, str]] = {
    "openai": {
        "messages": "the conversation",
        "tools": "function schemas, given to the chat template",
        "system": "a system message before the conversation",
        "parallel_tool_calls": "read; no effect (every call a turn holds is trained)",
        "label": "KTO label (desirable or not)",
        "kto_tag": "KTO label (desirable or not)",
    },
    "sharegpt": {
        "conversations": "the conversation",
        "system": "a system message before the conversation",
        "tools": "function schemas, given to the chat template",
        "kto_tag": "KTO label (desirable or not)",
        "label": "KTO label (desirable or not)",
    },
    "alpaca": {
        "instruction": "the user turn",
        "input": "appended to the user turn",
        "output": "the trained answer",
        "system": "a system message before the conversation",
        "history": "earlier [user, assistant] turns, trained (LLaMA-Factory's meaning)",
        "kto_tag": "KTO label (desirable or not)",
        "label": "KTO label (desirable or not)",
    },
    "completion": {
        "prompt": "the user turn (or the prompt messages)",
        "completion": "the trained answer (or the answer messages)",
        "tools": "function schemas, given to the chat template",
        "label": "KTO label (desirable or not)",
        "kto_tag": "KTO label (desirable or not)",
        "comment": "the user's note with a KTO verdict (serve --feedback); not trained",
        "model": "which model gave a KTO verdict's answer (serve/chat --feedback); not "
                 "trained",
    },
    "text": {"text": "trained as it is, every token"},
    "preference": {
        "prompt": "the prompt both answers share",
        "chosen": "the answer pushed up",
        "rejected": "the answer pushed down",
        "tools": "function schemas, given to the chat template",
        "system": "a system message before the prompt",
    },
    "openai_preference": {
        "input": "the prompt: its messages and tools",
        "preferred_output": "the answer pushed up",
        "non_preferred_output": "the answer pushed down",
    },
}
# Keys that say the same as the record's own keys in some public sets: read, checked to agree
# (a different value is an error), then not used twice.
REDUNDANT: dict[str, dict[str, str]] = {
    "openai": {"prompt": "checked: the first user turn (HuggingFaceH4/ultrachat_200k)"},
    "preference": {"messages": "checked: the chosen conversation "
                               "(HuggingFaceH4/ultrafeedback_binarized)"},
}
# Keys inside "input" of an OpenAI preference record.
INPUT_KEYS = {"messages": "the prompt", "tools": "function schemas, given to the chat template",
              "parallel_tool_calls": "read; no effect"}
MESSAGE_KEYS = {
    "role": "the speaker",
    "content": "the text",
    "tool_calls": "the assistant's function calls, given to the chat template",
    "tool_call_id": "which call a tool result answers",
    "name": "the function a tool result comes from",
    "reasoning_content": "the assistant's reasoning (see --reasoning)",
    "thinking": "the assistant's reasoning, read as reasoning_content (see --reasoning)",
    "weight": "0: context, not trained; 1: trained",
}
TURN_KEYS = {"from": "the speaker", "value": "the text", "weight": "0: context, not trained"}
# Known meanings edge-tune cannot honour: the record is refused, saying so.
UNSUPPORTED = {
    "images": "image inputs (edge-tune trains text-only models)",
    "image": "an image input (edge-tune trains text-only models)",
    "videos": "video inputs (edge-tune trains text-only models)",
    "audios": "audio inputs (edge-tune trains text-only models)",
}
# Keys that mark a record as KTO (unpaired preference) data.
KTO_KEYS = ("label", "kto_tag")


def drop_nulls(value):
    """``value`` with every ``null`` object member removed, at any depth (list items stay:
    their position means something). Pure."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def _nested(fmt: str) -> dict[str, tuple[dict[str, str], str]]:
    """record key -> (the key table of its items, how an item key is shown)."""
    if fmt == "sharegpt":
        return {"conversations": (TURN_KEYS, "conversations[].")}
    if fmt == "openai_preference":
        return {"input": (INPUT_KEYS, "input."),
                "preferred_output": (MESSAGE_KEYS, "preferred_output[]."),
                "non_preferred_output": (MESSAGE_KEYS, "non_preferred_output[].")}
    return {k: (MESSAGE_KEYS, f"{k}[].") for k in
            ("messages", "prompt", "completion", "chosen", "rejected")}


def record_keys(obj: dict, fmt: str) -> tuple[list[str], list[str]]:
    """(known keys used, ignored keys) of one record of format ``fmt``, nested keys written as
    ``messages[].id``; nulls already dropped. Each key once per record."""
    known = {**RECORD_KEYS[fmt], **REDUNDANT.get(fmt, {})}
    nested = _nested(fmt)
    used, ignored = [], []
    for key, value in obj.items():
        (used if key in known else ignored).append(str(key))
        table = nested.get(key)
        if table is None or key not in known:
            continue
        keys, prefix = table
        items = [value] if isinstance(value, dict) else value if isinstance(value, list) else []
        seen: set[str] = set()
        for item in items:
            if isinstance(item, dict):
                seen.update(str(k) for k in item)
        for k in sorted(seen):
            (used if k in keys else ignored).append(prefix + k)
    return used, ignored


def unsupported(obj: dict) -> Optional[str]:
    """The first key with a meaning edge-tune cannot honour, or None."""
    return next((k for k in obj if k in UNSUPPORTED), None)


def summary(ignored: Counter, limit: int = 8) -> str:
    """``id (200 records), source (200)``: the most common first, at most ``limit`` named."""
    items = ignored.most_common()
    parts = [f"{k} ({n} record{'s' if n != 1 else ''})" if i == 0 else f"{k} ({n})"
             for i, (k, n) in enumerate(items[:limit])]
    more = len(items) - limit
    return ", ".join(parts) + (f", and {more} more" if more > 0 else "")


def where_keys_go(used: Counter, fmt_of_key: dict[str, str]) -> dict[str, dict]:
    """``{key: {"records": n, "to": where it goes}}`` for the known keys seen."""
    out = {}
    for key, n in used.most_common():
        fmt = fmt_of_key.get(key, "")
        out[key] = {"records": n, "to": describe(key, fmt)}
    return out


def describe(key: str, fmt: str) -> str:
    """Where a known key (``messages[].weight`` for a nested one) goes, in words."""
    if "." in key:
        head, item = key.split(".", 1)
        head = head.rstrip("[]")
        table = dict(_nested(fmt)).get(head, (MESSAGE_KEYS, ""))[0]
        return table.get(item, "")
    return {**RECORD_KEYS.get(fmt, {}), **REDUNDANT.get(fmt, {})}.get(key, "")
