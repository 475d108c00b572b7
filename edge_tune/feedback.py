"""A user's verdict on an answer, kept as a KTO record: the file ``train --method kto`` reads.

Each verdict is one JSON line in TRL's conversational unpaired-preference format
(https://huggingface.co/docs/trl/dataset_formats, "unpaired preference"):
``{"prompt": [messages], "completion": [{"role": "assistant", "content": ...}], "label":
true|false}``, with ``tools`` when the conversation offered some, ``comment`` when the user
wrote one, and ``model``: who gave the answer (``base``, an adapter's name, or a mix
``a*0.5+b``) (the last two read by ``edge_tune.data``, never trained). Lines are appended and flushed one at a
time, so a file that is being written is always whole lines.

``serve --feedback FILE`` keeps the answers it gave (:class:`AnswerLog`, bounded by count and
age) so that ``POST /v1/feedback`` can turn a response id into a record; ``chat`` (``/good``,
``/bad``) and the TUI's chat write the record of their last answer directly. Standard library
only.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edge_tune.errors import UsageError

MAX_COMMENT = 2000  # characters of a verdict's comment
KEEP_ANSWERS = 1000  # answers a server remembers for a verdict, newest kept
KEEP_SECONDS = 24 * 3600  # and for how long
MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")


def plain_messages(messages: list) -> list[dict]:
    """Chat messages as a KTO record stores them: role (``developer`` read as ``system``),
    content as text (OpenAI's content parts joined), and the tool keys a record may carry;
    anything else (images, audio, names of other fields) left out."""
    out = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        msg = {k: m[k] for k in MESSAGE_KEYS if m.get(k) is not None}
        if msg.get("role") == "developer":
            msg["role"] = "system"
        content = msg.get("content")
        if isinstance(content, list):  # OpenAI's content parts: the text parts
            msg["content"] = "".join(p.get("text", "") for p in content
                                     if isinstance(p, dict) and p.get("type") == "text")
        if msg.get("role") and (msg.get("content") is not None or msg.get("tool_calls")):
            msg.setdefault("content", "")
            out.append(msg)
    return out


def kto_record(prompt: list, answer: dict, label: bool, comment: Optional[str] = None,
               tools: Optional[list] = None, model: Optional[str] = None) -> dict:
    """The KTO record of one verdict: ``prompt`` (the chat messages before the answer),
    ``answer`` (the assistant message: ``content``, ``tool_calls``), ``label`` (True: a good
    answer), ``model`` (who answered, kept as the record's ``model`` key). Raises UsageError for an empty prompt or answer or a non-boolean label."""
    if not isinstance(label, bool):
        raise UsageError(f"label: expected true (a good answer) or false (a bad one), got "
                         f"{label!r}")
    msgs = plain_messages(prompt)
    if not any(m["role"] == "user" for m in msgs):
        raise UsageError("feedback: the answer's prompt has no user message")
    said = {k: answer[k] for k in ("content", "tool_calls") if answer.get(k)}
    if not said:
        raise UsageError("feedback: the answer is empty (nothing to learn from)")
    record = {"prompt": msgs, "completion": [{"role": "assistant", "content": "", **said}],
              "label": label}
    if tools:
        record["tools"] = tools
    if comment:
        record["comment"] = str(comment)[:MAX_COMMENT]
    if model:
        record["model"] = str(model)
    return record


_append_lock = threading.Lock()


def append(path: Path, record: dict) -> None:
    """Append ``record`` to ``path`` as one JSON line, flushed to disk before returning
    (parent folders made). Raises UsageError when the file cannot be written."""
    path = Path(path)
    line = json.dumps(record, ensure_ascii=False) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _append_lock, open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise UsageError(f"--feedback {path}: cannot write ({exc.strerror or exc})") from None


@dataclass
class Answer:
    """An answer the server gave: the request's messages and tools, the assistant message,
    and the model the request named."""
    prompt: list
    answer: dict
    tools: Optional[list]
    at: float
    judged: bool = False
    model: Optional[str] = None


class AnswerLog:
    """The last ``keep`` answers a server gave (none older than ``seconds``), by response id,
    and the file their verdicts go to. Thread-safe."""

    def __init__(self, path: Path, keep: int = KEEP_ANSWERS, seconds: float = KEEP_SECONDS,
                 clock=time.monotonic) -> None:
        self.path = Path(path)
        self.keep, self.seconds, self.clock = keep, seconds, clock
        self._answers: OrderedDict[str, Answer] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, answer_id: str, prompt: list, answer: dict,
                 tools: Optional[list] = None, model: Optional[str] = None) -> None:
        with self._lock:
            self._answers[answer_id] = Answer(prompt, answer, tools, self.clock(), model=model)
            self._answers.move_to_end(answer_id)
            self._expire()

    def _expire(self) -> None:
        oldest = self.clock() - self.seconds
        while self._answers and (len(self._answers) > self.keep or
                                 next(iter(self._answers.values())).at < oldest):
            self._answers.popitem(last=False)

    def judge(self, answer_id: str, label: bool, comment: Optional[str] = None) -> dict:
        """Write the KTO record of answer ``answer_id`` with ``label`` and return it. Raises
        KeyError for an id not (or no longer) kept, ValueError for one already judged,
        UsageError for a bad label or an unwritable file."""
        with self._lock:
            self._expire()
            found = self._answers[answer_id]
            if found.judged:
                raise ValueError(answer_id)
            record = kto_record(found.prompt, found.answer, label, comment, found.tools,
                                found.model)
            append(self.path, record)
            found.judged = True
        return record
