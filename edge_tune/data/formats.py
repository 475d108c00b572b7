"""Read chat records and say exactly what is wrong with a bad one. Pure logic + file reading.

Each record becomes a list of ``{"role", "content"}`` messages. Errors name ``FILE:LINE`` and
what was expected, as one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edge_tune.errors import EdgeTuneError

ROLES = ("system", "user", "assistant")


@dataclass
class Record:
    messages: list[dict]
    line: int  # 1-based line in the source file


def check_messages(obj, where: str) -> list[dict]:
    """Validate one OpenAI-style chat record; returns its messages."""
    if not isinstance(obj, dict):
        raise EdgeTuneError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" not in obj:
        keys = ", ".join(sorted(obj)) or "none"
        raise EdgeTuneError(f"{where}: missing field 'messages' (found keys: {keys}; expected "
                            '{"messages": [{"role": ..., "content": ...}, ...]})')
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise EdgeTuneError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise EdgeTuneError(f"{at}: expected an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise EdgeTuneError(f"{at}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise EdgeTuneError(f"{at}: 'content' must be a string, got "
                                f"{type(content).__name__}")
        if not content.strip():
            raise EdgeTuneError(f"{at}: 'content' is empty")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise EdgeTuneError(f"{where}: conversation has no assistant turn (nothing to learn)")
    return out


def read_jsonl(path: Path) -> list[Record]:
    path = Path(path)
    if not path.exists():
        raise EdgeTuneError(f"{path}: no such data file")
    if path.is_dir():
        raise EdgeTuneError(f"{path}: is a directory (expected a .jsonl file)")
    records: list[Record] = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as exc:
            raise EdgeTuneError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EdgeTuneError(f"{path}:{n}: invalid JSON ({exc.msg} at column {exc.colno})")
        records.append(Record(check_messages(obj, f"{path}:{n}"), n))
    if not records:
        raise EdgeTuneError(f"{path}: empty dataset (no records)")
    return records
