"""Turn records of every common shape into chat messages, and say exactly what is wrong with a
bad one. The normalisers here are pure; :mod:`edge_tune.data.readers` does the file reading.

Shapes (one per file, detected from its first valid record unless ``fmt`` is given):
OpenAI chat, ShareGPT, Alpaca, prompt/completion (all become OpenAI-style ``messages``) and
plain text (kept as ``text``); preference pairs for DPO/ORPO (:mod:`edge_tune.data.preference`:
TRL's prompt/chosen/rejected and OpenAI's preference format). Errors are one line: ``FILE:LINE: what is wrong (expected)``.

OpenAI chat records may carry what OpenAI's fine-tuning format and Hugging Face chat templates
use for tool calling: a record-level ``tools`` list of function schemas, assistant
``tool_calls`` (``content`` may then be null or absent), ``tool`` messages with
``tool_call_id``/``name``, an assistant ``reasoning_content``, and a per-message ``weight``
(0: context only, 1: trained; only on assistant messages). Tool-call ``arguments`` given as a
JSON string (OpenAI's form) are parsed into an object, which is what HF templates expect.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional, Union

from edge_tune.data import keys, preference, reasoning
from edge_tune.data.keys import KTO_KEYS
from edge_tune.data.readers import Row, Source, file_source, json_kind, open_sources
from edge_tune.errors import DataError, EdgeTuneError, UsageError

ROLES = ("system", "user", "assistant", "tool")
PASS_THROUGH = ("tool_calls", "tool_call_id", "name", "reasoning_content")  # kept, checked
# Openers of think blocks written into an answer's text
THINK_OPENERS = tuple(start for start, _end, _source in reasoning.KNOWN_MARKERS)
FROM_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "system": "system"}

# What each format looks like, quoted in errors so the user sees the shape that was expected.
SHAPES = {
    "openai": '{"messages": [{"role": ..., "content": ...}, ...]}',
    "sharegpt": '{"conversations": [{"from": ..., "value": ...}, ...]}',
    "alpaca": '{"instruction": ..., "input"?: ..., "output": ...}',
    "completion": '{"prompt": ..., "completion": ...}',
    "text": '{"text": ...}',
    **preference.SHAPES,
}
LABELS = {"openai": "OpenAI chat", "sharegpt": "ShareGPT", "alpaca": "Alpaca",
          "completion": "prompt/completion", "text": "plain text", **preference.LABELS}
# A record is of the first format (in this order) that has any of its keys: a record with
# "output" but no "instruction" is an Alpaca record missing a field, not an unknown shape.
# Preference records come first: TRL's carry a "prompt" too.
SIGNATURES = {**preference.SIGNATURES, "openai": ("messages",), "sharegpt": ("conversations",),
              "alpaca": ("instruction", "output"), "completion": ("prompt", "completion"),
              "text": ("text",)}


@dataclass
class Record:
    messages: Optional[list[dict]]  # None for a plain-text record
    line: int  # 1-based line in the source file (record index for .json/.parquet/hub)
    text: Optional[str] = None  # set for a plain-text record only
    source: str = ""  # the file (or hub ID) it came from: a directory holds several
    tools: Optional[list[dict]] = None  # an OpenAI record's function schemas (for the template)
    where: str = ""  # "FILE:LINE" (or "FILE:#N"): the start of every message about the record
    # a preference record: ``messages`` is prompt + chosen answer, this prompt + rejected one
    rejected: Optional[list[dict]] = None
    # a KTO record (TRL's ``label``, LLaMA-Factory's ``kto_tag``): is its answer desirable?
    label: Optional[bool] = None


def job_record(record: Record) -> dict:
    """A record as the training job carries it (JSON-safe): ``messages`` (with ``tools`` when
    it has any) or ``text``, and ``where`` for per-record errors at tokenization."""
    out = {"text": record.text} if record.messages is None else {"messages": record.messages}
    if record.tools:
        out["tools"] = record.tools
    if record.rejected is not None:
        out["rejected"] = record.rejected
    if record.label is not None:  # KTO: read by --method kto, ignored by the others
        out["label"] = record.label
    if record.where:
        out["where"] = record.where
    return out


@dataclass
class ReadResult:
    records: list[Record]
    format: str  # the detected (or forced) format; "mixed" for a directory of several
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, message)
    formats: dict[str, str] = field(default_factory=dict)  # source -> its format
    # key -> records that had it: keys no format table knows, and known keys (where they
    # went: edge_tune.data.keys); nested keys as "messages[].id"
    ignored: Counter = field(default_factory=Counter)
    used: Counter = field(default_factory=Counter)
    key_formats: dict[str, str] = field(default_factory=dict)  # used key -> its format
    undesirable_left_out: int = 0  # KTO records (label false) left out by --desirable-only

    def ignored_line(self) -> str:
        """``ignored keys: id (200 records), source (200)``, or "" when none were."""
        return f"ignored keys: {keys.summary(self.ignored)}" if self.ignored else ""

    def keys_report(self) -> dict:
        """``{"used": {key: {"records", "to"}}, "ignored": {key: records}}`` (JSON-safe)."""
        return {"used": keys.where_keys_go(self.used, self.key_formats),
                "ignored": dict(self.ignored.most_common())}

    @property
    def kto(self) -> tuple[int, int]:
        """(desirable, undesirable) KTO records; (0, 0) for other data."""
        return (sum(1 for r in self.records if r.label is True),
                sum(1 for r in self.records if r.label is False))


# ---- small helpers for messages ---------------------------------------------------------------

def _show(value, limit: int = 40) -> str:
    """A user's value in a message: repr keeps it on one line, the cut keeps the line short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _keys(obj: dict) -> str:
    names = [k if isinstance(k, str) and k.isidentifier() and len(k) <= 40 else _show(k)
             for k in sorted(obj, key=str)]
    return ", ".join(names[:10]) + (", ..." if len(names) > 10 else "") or "none"


def _object(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {json_kind(obj)}")
    return obj


def _field(obj: dict, key: str, where: str, shape: str, optional: bool = False) -> str:
    """``obj[key]`` as a string. Required fields must be non-empty; optional ones may be
    absent or null (Parquet and hub datasets fill absent columns with null), giving ""."""
    value = obj.get(key)
    if value is None and (optional or key not in obj):
        if optional:
            return ""
        raise DataError(f"{where}: missing field {key!r} (found keys: {_keys(obj)}; "
                        f"expected {shape})")
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {json_kind(value)}")
    if not optional and not value.strip():
        raise DataError(f"{where}: {key!r} is empty")
    return value


def _turns(obj: dict, key: str, where: str, fmt: str) -> list:
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r} (found keys: {_keys(obj)}; "
                        f"expected {SHAPES[fmt]})")
    turns = obj[key]
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if isinstance(turns, list) else json_kind(turns)
        raise DataError(f"{where}: {key!r} must be a non-empty list, got {got}")
    return turns


def _need_assistant(messages: list[dict], where: str, key: str = "messages") -> list[dict]:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: conversation has no assistant turn (nothing to learn)")
    if messages[0]["role"] == "assistant":  # its prompt would be an empty conversation
        raise DataError(f"{where}: {key}[0]: the conversation starts with an assistant "
                        "turn (expected a user or system message before the first "
                        "assistant answer: the prompt it answers)")
    return messages  # every assistant turn at weight 0: kept, an example with nothing trained


def _json_object(value, at: str, what: str):
    """A JSON object given as itself or as a string holding one (OpenAI's tool-call
    arguments; tool columns of CSV/Parquet files)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{at}: {what} is not valid JSON ({exc.msg} at column "
                            f"{exc.colno}; expected a JSON object)") from None
    return value


def _tool_calls(calls, role: str, at: str) -> list[dict]:
    """OpenAI tool calls, each as ``{"type": "function", "id"?, "function": {"name",
    "arguments": object}}`` (a flat ``{"name", "arguments"}`` is wrapped)."""
    if role != "assistant" or not isinstance(calls, list) or not calls \
            or not all(isinstance(c, dict) for c in calls):
        raise DataError(f"{at}: 'tool_calls' must be a non-empty list of objects on an "
                        f"assistant message (got {json_kind(calls)} on {role})")
    out = []
    for j, call in enumerate(calls):
        here = f"{at}: tool_calls[{j}]"
        fn = call.get("function", call)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f"{here}: missing function name (expected {{\"type\": "
                            f"\"function\", \"function\": {{\"name\": ..., "
                            f"\"arguments\": ...}}}})")
        args = _json_object(fn.get("arguments", {}), here, "'arguments'")
        if not isinstance(args, dict):
            raise DataError(f"{here}: 'arguments' must be a JSON object (or a string "
                            f"holding one), got {json_kind(args)}")
        new = {"type": call.get("type", "function"),
               "function": {**fn, "name": fn["name"], "arguments": args}}
        if "id" in call:
            new["id"] = call["id"]
        out.append(new)
    return out


def _weight(m: dict, role: str, at: str) -> dict:
    """``{"weight": 0}`` for a context-only assistant turn, ``{}`` when it is trained."""
    if "weight" not in m:
        return {}
    w = m["weight"]
    if role != "assistant":
        raise DataError(f"{at}: 'weight' is only for assistant messages (got it on {role})")
    if isinstance(w, bool) or w not in (0, 1):
        raise DataError(f"{at}: 'weight' must be 0 (context, not trained) or 1 (trained), "
                        f"got {_show(w)}")
    return {"weight": 0} if w == 0 else {}


def record_tools(obj: dict, where: str) -> Optional[list[dict]]:
    """A record's ``tools`` (function schemas for the chat template), or None. Each must be
    an object naming its function: ``{"type": "function", "function": {"name": ...,
    "description": ..., "parameters": ...}}``, or the flat ``{"name": ...}``, which is wrapped
    into that form. A JSON string holding the list is parsed."""
    tools = obj.get("tools")
    if tools is None:
        return None
    tools = _json_object(tools, where, "'tools'")
    if not isinstance(tools, list):
        raise DataError(f"{where}: 'tools' must be a list of function schemas, got "
                        f"{json_kind(tools)}")
    out = []
    for j, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f"{where}: tools[{j}]: expected a function schema "
                            '({"type": "function", "function": {"name": ..., '
                            '"parameters": ...}})')
        # The flat {"name", "parameters"} form (LLaMA-Factory's) wrapped as OpenAI's, which
        # chat templates read (LLaMA-Factory wraps it the same way before rendering).
        out.append(tool if "function" in tool else {"type": "function", "function": tool})
    return out or None


# ---- one normaliser per format ---------------------------------------------------------------

def _openai_message(m, at: str) -> dict:
    if not isinstance(m, dict):
        raise DataError(f"{at}: expected an object with 'role' and 'content', got "
                        f"{json_kind(m)}")
    if "role" not in m:
        raise DataError(f"{at}: missing field 'role' (found keys: {_keys(m)}; expected "
                        '{"role": ..., "content": ...})')
    role = m["role"]
    if role not in ROLES:
        raise DataError(f"{at}: unknown role {_show(role)} (expected one of "
                        f"{', '.join(ROLES)})")
    m = _thinking(m, at)
    extra = {k: m[k] for k in PASS_THROUGH if m.get(k) is not None}
    calls = extra.get("tool_calls")
    if calls is not None:
        extra["tool_calls"] = _tool_calls(calls, role, at)
    for key in ("tool_call_id", "name", "reasoning_content"):
        if key in extra and not isinstance(extra[key], str):
            raise DataError(f"{at}: {key!r} must be a string, got {json_kind(extra[key])}")
    if "reasoning_content" in extra and isinstance(m.get("content"), str) and any(
            marker in m["content"] for marker in THINK_OPENERS):
        raise DataError(f"{at}: the reasoning is given twice: in 'reasoning_content' and "
                        "as a think block in 'content' (expected one of them; the chat "
                        "template or --reasoning inline writes the block)")
    if "reasoning_content" in extra and role != "assistant":
        raise DataError(f"{at}: 'reasoning_content' is only for assistant messages (got "
                        f"it on {role})")
    # A tool-calling assistant turn may carry no text: the calls are what it says.
    content = _field(m, "content", at, '{"role": ..., "content": ...}', optional=bool(calls))
    return {"role": role, "content": m.get("content") if calls else content, **extra,
            **_weight(m, role, at)}


def _thinking(m: dict, at: str) -> dict:
    """``thinking`` (gpt-oss's and some distillation sets' name) read as ``reasoning_content``
    (DeepSeek's and Qwen3's); both with different text is an error."""
    if m.get("thinking") is None:
        return m
    if m.get("reasoning_content") not in (None, m["thinking"]):
        raise DataError(f"{at}: 'thinking' and 'reasoning_content' differ (expected one "
                        "reasoning text per message)")
    rest = {k: v for k, v in m.items() if k != "thinking"}
    return {**rest, "reasoning_content": m["thinking"]}


def _with_system(messages: list[dict], obj: dict, where: str, shape: str) -> list[dict]:
    """A record-level ``system`` (ShareGPT, LLaMA-Factory, Alpaca) as the first message. A
    conversation that already starts with a different system message is an error."""
    system = _field(obj, "system", where, shape, optional=True)
    if not system.strip():
        return messages
    if messages and messages[0]["role"] == "system":
        if messages[0]["content"] == system:
            return messages
        raise DataError(f"{where}: 'system' and the conversation's own system message "
                        "differ (expected one system prompt per record)")
    return [{"role": "system", "content": system}] + messages


def check_messages(obj, where: str) -> list[dict]:
    """Validate one OpenAI-style chat record; returns its messages (a record-level ``system``
    put first; a ``prompt`` that repeats the first user turn checked)."""
    turns = _turns(_object(obj, where), "messages", where, "openai")
    messages = _need_assistant([_openai_message(m, f"{where}: messages[{i}]")
                                for i, m in enumerate(turns)], where)
    prompt = obj.get("prompt")
    if prompt is not None:
        first = next((m["content"] for m in messages if m["role"] == "user"), None)
        if not isinstance(prompt, str) or first is None or prompt.strip() != first.strip():
            raise DataError(f"{where}: 'prompt' is not the conversation's first user turn "
                            "(a record with 'messages' may repeat its first user turn as "
                            "'prompt', as HuggingFaceH4/ultrachat_200k does; anything else "
                            "is ambiguous: remove it, or map it with --columns)")
    return _with_system(messages, obj, where, SHAPES["openai"])


# LLaMA-Factory's ShareGPT tool turns: function_call (the assistant's call, JSON) and
# observation (the tool's result).
TOOL_FROM = {"function_call": "assistant", "observation": "tool"}


def _sharegpt(obj: dict, where: str) -> list[dict]:
    out = []
    for i, turn in enumerate(_turns(obj, "conversations", where, "sharegpt")):
        at = f"{where}: conversations[{i}]"
        shape = '{"from": ..., "value": ...}'
        if not isinstance(turn, dict):
            raise DataError(f"{at}: expected an object with 'from' and 'value', got "
                            f"{json_kind(turn)}")
        if "from" not in turn:
            raise DataError(f"{at}: missing field 'from' (found keys: {_keys(turn)}; "
                            f"expected {shape})")
        frm = turn["from"]
        role = FROM_ROLES.get(frm) or TOOL_FROM.get(frm) if isinstance(frm, str) else None
        if role is None:
            raise DataError(f"{at}: unknown 'from' value {_show(frm)} (expected one of "
                            f"{', '.join([*FROM_ROLES, *TOOL_FROM])})")
        value = _field(turn, "value", at, shape)
        if frm == "function_call":
            calls = _json_object(value, at, "the function_call 'value'")
            calls = calls if isinstance(calls, list) else [calls]
            out.append({"role": role, "content": None,
                        "tool_calls": _tool_calls(calls, role, at), **_weight(turn, role, at)})
        else:
            out.append({"role": role, "content": value, **_weight(turn, role, at)})
    return _with_system(_need_assistant(out, where, "conversations"), obj, where,
                        SHAPES["sharegpt"])


def _alpaca(obj: dict, where: str) -> list[dict]:
    shape = SHAPES["alpaca"]
    instruction = _field(obj, "instruction", where, shape)
    extra = _field(obj, "input", where, shape, optional=True)
    output = _field(obj, "output", where, shape)
    user = instruction + "\n\n" + extra if extra.strip() else instruction
    return _with_system(_history(obj.get("history"), where) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": output}],
        obj, where, shape)


def _history(history, where: str) -> list[dict]:
    """LLaMA-Factory's Alpaca ``history``: ``[[user, assistant], ...]`` before the instruction.
    Its answers are trained, as LLaMA-Factory trains them."""
    if history is None:
        return []
    shape = '[["earlier instruction", "its answer"], ...]'
    if not isinstance(history, list):
        raise DataError(f"{where}: 'history' must be a list of [user, assistant] pairs, "
                        f"got {json_kind(history)} (expected {shape})")
    out = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(
                isinstance(x, str) and x.strip() for x in pair)):
            raise DataError(f"{where}: history[{i}]: expected a pair of non-empty strings "
                            f"[user, assistant] (expected {shape})")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return out


def _completion(obj: dict, where: str) -> list[dict]:
    """Text ``prompt``/``completion``, or TRL's conversational prompt-completion: both message
    lists (the prompt's assistant turns are context; the completion is what is trained)."""
    shape = SHAPES["completion"]
    if isinstance(obj.get("prompt"), list) or isinstance(obj.get("completion"), list):
        prompt = _message_list(obj, "prompt", where, "user")
        completion = _message_list(obj, "completion", where, "assistant")
        if not any(m["role"] == "assistant" for m in completion) or \
                any(m["role"] in ("user", "system") for m in completion):
            raise DataError(f"{where}: 'completion' must hold the answer: assistant (and "
                            "tool) messages only (expected TRL's conversational "
                            "prompt-completion: {\"prompt\": [messages], \"completion\": "
                            "[{\"role\": \"assistant\", ...}]})")
        context = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in prompt]
        return _need_assistant(context + completion, where, "prompt")
    return [{"role": "user", "content": _field(obj, "prompt", where, shape)},
            {"role": "assistant", "content": _field(obj, "completion", where, shape)}]


def _message_list(obj: dict, key: str, where: str, role: str) -> list[dict]:
    value = obj.get(key)
    if isinstance(value, str) and value.strip():
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else json_kind(value)
        raise DataError(f"{where}: {key!r} must be text or a non-empty list of messages, "
                        f"got {got}")
    return [_openai_message(m, f"{where}: {key}[{i}]") for i, m in enumerate(value)]


def _text(obj: dict, where: str) -> str:
    return _field(obj, "text", where, SHAPES["text"])


def record_label(obj: dict, where: str) -> Optional[bool]:
    """A KTO record's label: TRL's ``label`` or LLaMA-Factory's ``kto_tag`` (true: a desirable
    answer; false: an undesirable one), or None for a record that has neither."""
    found = [k for k in KTO_KEYS if obj.get(k) is not None]
    if not found:
        return None
    value = obj[found[0]]
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # CSV cells
        value = value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise DataError(f"{where}: {found[0]!r} must be true (a desirable answer) or false "
                        f"(an undesirable one), got {_show(value)}")
    return value


NORMALISERS = {"openai": check_messages, "sharegpt": _sharegpt, "alpaca": _alpaca,
               "completion": _completion, "text": _text,
               **{fmt: partial(pair, check=_openai_message)
                  for fmt, pair in preference.NORMALISERS.items()}}


def detect_format(obj) -> Optional[str]:
    """The format a record's keys say it is, or None when they match no known shape."""
    if isinstance(obj, dict):
        for fmt, keys in SIGNATURES.items():
            if any(k in obj for k in keys):
                return fmt
    return None


def normalise(obj, fmt: str, where: str) -> Union[list[dict], str, preference.Pair]:
    """One record of format ``fmt`` as chat messages (a string for "text", a pair of
    conversations for the preference formats), or a one-line
    EdgeTuneError that starts with ``where``."""
    return NORMALISERS[fmt](_object(obj, where), where)


# ---- reading ---------------------------------------------------------------------------------

def read_records(path, fmt: str = "auto", skip_invalid: bool = False,
                 reasoning: str = "auto") -> ReadResult:
    """Records from a data file (.jsonl .json .csv .tsv .parquet .txt), a directory of them,
    or a hub dataset ID. Raises at the first bad record, or with ``skip_invalid`` lists it in
    ``skipped`` and goes on; raises "empty dataset" when no valid record remains.
    ``reasoning``: auto (assistant reasoning kept for the template), inline or drop
    (:func:`edge_tune.data.reasoning.apply`)."""
    if fmt != "auto" and fmt not in NORMALISERS:
        raise UsageError(f"unknown data format {_show(fmt)} (expected one of auto, "
                         f"{', '.join(NORMALISERS)})")
    return _collect(str(path), open_sources(path), fmt, skip_invalid, reasoning)


def read_jsonl(path) -> list[Record]:
    """One OpenAI-chat JSONL file, whatever its suffix: the original entry point."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path}: is a directory (expected a .jsonl file)")
    return _collect(str(path), [file_source(path, "jsonl")], "openai", False).records


def _collect(name: str, sources: list[Source], fmt: str, skip_invalid: bool,
             reasoning_mode: str = "auto") -> ReadResult:
    result = ReadResult([], fmt)
    for source in sources:
        source_fmt = _read_source(source, fmt, skip_invalid, result, reasoning_mode)
        if source_fmt:
            result.formats[source.name] = source_fmt
    if not result.records:
        why = ""
        if result.skipped:
            why = f" - all {len(result.skipped)} were invalid; first: {result.skipped[0][1]}"
        raise DataError(f"{name}: empty dataset (no records){why}")
    found = set(result.formats.values())
    result.format = found.pop() if len(found) == 1 else "mixed"
    return result


def _read_source(source: Source, fmt: str, skip_invalid: bool, result: ReadResult,
                 reasoning_mode: str = "auto"):
    """Normalise one file's rows into ``result``; returns the file's format (None if unknown)."""
    file_fmt = None if fmt == "auto" else fmt
    decided_at = ""  # where auto-detection fixed the format: quoted in mixed-format errors
    seen = False
    for row in source.rows:
        seen = True
        row = Row(row.line, row.where, keys.drop_nulls(row.value), row.error)
        try:
            if file_fmt is None:
                # The first *valid* record decides, so with skip_invalid leading junk that
                # merely looks like another format cannot make the whole file mismatched.
                row_fmt = _detect(row)
                record = _record_of(row, source.name, row_fmt, reasoning_mode)
                file_fmt, decided_at = row_fmt, row.where
            else:
                _check_same_format(row, file_fmt, decided_at)
                record = _record_of(row, source.name, file_fmt, reasoning_mode)
            used, ignored = keys.record_keys(row.value, file_fmt)
            result.records.append(record)
            result.used.update(used)
            result.ignored.update(ignored)
            result.key_formats.update((k, file_fmt) for k in used)
        except EdgeTuneError as exc:
            if not skip_invalid:
                raise
            result.skipped.append((row.line, str(exc)))
    if not seen:
        raise DataError(f"{source.name}: empty dataset (no records)")
    return file_fmt


def _record_of(row: Row, source: str, fmt: str, reasoning_mode: str) -> Record:
    obj = _object(row.value, row.where)
    bad = keys.unsupported(obj)
    if bad is not None:
        raise DataError(f"{row.where}: {bad!r} holds {keys.UNSUPPORTED[bad]}: remove the "
                        "key to train the text alone")
    if fmt in preference.PREFERENCE_FORMATS and any(obj.get(k) is not None for k in KTO_KEYS):
        raise DataError(f"{row.where}: a preference pair with a KTO label (expected either "
                        "chosen/rejected pairs or unpaired answers with 'label')")
    normalised = normalise(obj, fmt, row.where)  # a missing field first: the likelier fault
    _other_formats_keys(obj, fmt, row.where)
    record = _record(normalised, row, source, fmt)
    if fmt not in preference.PREFERENCE_FORMATS and fmt != "text":
        record.label = record_label(obj, row.where)
    if reasoning_mode != "auto":
        if record.messages is not None:
            record.messages = reasoning.apply(record.messages, reasoning_mode)
        if record.rejected is not None:
            record.rejected = reasoning.apply(record.rejected, reasoning_mode)
    return record


def _detect(row: Row) -> str:
    if row.error:
        raise DataError(row.error)
    fmt = detect_format(_object(row.value, row.where))
    if fmt is None:
        shapes = ", ".join(f"{SHAPES[f]} ({LABELS[f]})" for f in SHAPES)
        raise DataError(f"{row.where}: unknown record shape (found keys: "
                        f"{_keys(row.value)}; expected one of {shapes})")
    return fmt


def _check_same_format(row: Row, file_fmt: str, decided_at: str) -> None:
    if row.error:
        raise DataError(row.error)
    found = detect_format(row.value)
    # Only when the format was detected: a forced fmt reports the missing fields instead.
    if decided_at and found and found != file_fmt:
        raise DataError(f"{row.where}: record is {LABELS[found]} but this file is "
                        f"{LABELS[file_fmt]} (detected at {decided_at}; one format per file, "
                        f"expected {SHAPES[file_fmt]})")


def _other_formats_keys(obj: dict, fmt: str, where: str) -> None:
    """A key that belongs to another format (``output`` in a chat record) has a meaning this
    record's format cannot honour: refused, not dropped."""
    mine = {*keys.RECORD_KEYS[fmt], *keys.REDUNDANT.get(fmt, {})}
    for other, signature in SIGNATURES.items():
        for key in signature:
            if other != fmt and key in obj and key not in mine:
                raise DataError(
                f"{where}: {key!r} is a key of the {LABELS[other]} format, but this record is "
                f"{LABELS[fmt]} (expected {SHAPES[fmt]}; rename or drop the key, e.g. "
                f"with --columns, so each record says one thing)")


def _record(normalised: Union[list[dict], str, preference.Pair], row: Row, source: str,
            fmt: str) -> Record:
    obj = row.value
    box = obj.get("input") if fmt == "openai_preference" else obj
    tools = record_tools(box, row.where) if isinstance(box, dict) else None
    if isinstance(normalised, tuple):  # (prompt + chosen, prompt + rejected)
        return Record(normalised[0], row.line, source=source, where=row.where,
                      rejected=normalised[1], tools=tools)
    if isinstance(normalised, str):
        return Record(None, row.line, text=normalised, source=source, where=row.where)
    return Record(normalised, row.line, source=source, tools=tools, where=row.where)
