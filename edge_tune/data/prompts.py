"""GRPO's data: prompt records, each ending before the assistant turn the model is to write,
and the columns handed to the reward functions.

A record's prompt is, by the first key it has:

* ``prompt``: text (one user turn) or a list of messages (TRL's prompt-only format);
* ``messages``: OpenAI chat messages ending in a user (or tool) turn;
* ``conversations``: ShareGPT turns ending in a human turn;
* ``instruction`` (+ ``input``): Alpaca without ``output``.

A record-level ``system`` goes first, as for training data. Every other key is a column: the
reward functions get it (TRL passes a dataset's extra columns the same way), so nothing is
dropped; ``tools`` also renders into the prompt, as TRL does. A prompt that ends with an
assistant turn is refused (it would train on a finished conversation). Errors are one line,
``FILE:LINE: what is wrong``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from edge_tune.errors import DataError

PROMPT_KEYS = ("prompt", "messages", "conversations", "instruction")
_SHARE_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system", "observation": "tool", "tool": "tool"}
SHAPE = ('{"prompt": "..." | [messages], ...columns} or {"messages": [..., user turn]} or '
         '{"conversations": [..., human turn]} or {"instruction": ..., "input"?: ...}')


def prompt_messages(obj, where: str) -> tuple[list[dict], set[str]]:
    """The prompt of one record as chat messages, and the keys that made it (the rest are
    columns). Raises DataError (one line, starting with ``where``) for a record with no
    prompt key, a malformed one, or one that ends with an assistant turn."""
    from edge_tune.data.formats import _openai_message

    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object (expected {SHAPE})")
    key = next((k for k in PROMPT_KEYS if obj.get(k) is not None), None)
    if key is None:
        raise DataError(f"{where}: no prompt (found keys: {', '.join(sorted(obj)) or 'none'}; "
                        f"expected {SHAPE})")
    used = {key, "system"}
    value = obj[key]
    if key == "instruction":
        extra = obj.get("input")
        used.add("input")
        if not isinstance(value, str) or (extra is not None and not isinstance(extra, str)):
            raise DataError(f"{where}: 'instruction' and 'input' must be text")
        text = value + ("\n\n" + extra if extra and extra.strip() else "")
        messages = [{"role": "user", "content": text}]
    elif isinstance(value, str):
        if key != "prompt":
            raise DataError(f"{where}: {key!r} must be a list of turns, got text")
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value:
        turns = _sharegpt(value, where) if key == "conversations" else value
        messages = [_openai_message(m, f"{where}: {key}[{i}]") for i, m in enumerate(turns)]
    else:
        raise DataError(f"{where}: {key!r} must be text or a non-empty list of messages")
    if not messages[-1].get("content") and messages[-1]["role"] == "user":
        raise DataError(f"{where}: the last user turn is empty")
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt ends with an assistant turn (expected it to end "
                        "before the answer GRPO samples: drop the last assistant message, or "
                        "move it to a column such as 'answer' for a reward to compare with)")
    system = obj.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return messages, used


def _sharegpt(turns: list, where: str) -> list[dict]:
    out = []
    for i, t in enumerate(turns):
        role = _SHARE_ROLES.get(t.get("from")) if isinstance(t, dict) else None
        if role is None or not isinstance(t.get("value"), str):
            raise DataError(f"{where}: conversations[{i}]: expected {{\"from\": human|gpt|"
                            "system, \"value\": text}")
        out.append({"role": role, "content": t["value"]})
    return out


@dataclass
class PromptData:
    """Prompt records as the job carries them (``messages``: the prompt, ``columns``, and
    ``tools`` / ``where`` when present), the lines skipped (``--skip-invalid``) and how many
    records had each column."""

    records: list[dict]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    columns: Counter = field(default_factory=Counter)


def read_prompts(spec, skip_invalid: bool = False) -> PromptData:
    """The prompt records of ``spec`` (a path, hub spec or :class:`~edge_tune.data.layouts.
    DataSpec`: every file type the readers know, ``--columns`` applied). Raises DataError at
    the first bad record (or with ``skip_invalid`` lists it and goes on), and for no record."""
    from edge_tune.data.readers import open_sources

    out = PromptData([])
    for source in open_sources(spec):
        for row in source.rows:
            try:
                if row.error:
                    raise DataError(row.error)
                messages, used = prompt_messages(row.value, row.where)
            except DataError as exc:
                if not skip_invalid:
                    raise
                out.skipped.append((row.line, str(exc)))
                continue
            columns = {k: v for k, v in row.value.items() if k not in used}
            record = {"messages": messages, "columns": columns, "where": row.where}
            if isinstance(columns.get("tools"), list):
                record["tools"] = columns["tools"]
            out.records.append(record)
            out.columns.update(columns.keys())
    if not out.records:
        first = f"; first: {out.skipped[0][1]}" if out.skipped else ""
        raise DataError(f"{spec}: no prompt records{first}")
    return out
