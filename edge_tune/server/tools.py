"""Tool calling through the model's own chat template: which call syntax a template uses,
the request's ``tools`` / ``tool_choice``, and the model's calls parsed back into OpenAI's
``tool_calls``.

Syntaxes (what the templates in :mod:`edge_tune.templates.builtin` render for an assistant turn
with ``tool_calls``, and what their models are trained to write):

- ``hermes`` (Qwen2.5, Qwen3, Hermes, SmolLM3...): ``<tool_call>\\n{"name": N, "arguments":
  {...}}\\n</tool_call>``, one block per call;
- ``llama3`` (Llama 3.1-3.3 JSON tool calling): one JSON object ``{"name": N,
  "parameters": {...}}`` as the whole answer, optionally after ``<|python_tag|>``;
- ``mistral`` (Mistral 7B Instruct v0.3, Mistral Nemo/Small, the ``[TOOL_CALLS]`` control
  token): ``[TOOL_CALLS] [{"name": N, "arguments": {...}}, ...]``, every call in one JSON
  list, after any text; the templates require call ids of exactly 9 letters or digits.

A call syntax's marker may be a control token (``<|python_tag|>``, ``[TOOL_CALLS]``), which
llama.cpp leaves out of the answer's text; so an answer that is nothing but calls is parsed
as calls with its marker or without.

The syntax is found by rendering a probe call with the template itself, so a template file
given with ``--chat-template`` is recognised by what it renders, not by its name. Pure
except for the Jinja render; no llama.cpp.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass

from edge_tune.server.errors import RequestError

_PROBE = "edge_tune_probe_fn"
_PROBE_ARGS = {"edge_tune_probe_arg": 7}
_PROBE_ID = "c0a1b2c3d"  # 9 letters and digits: Mistral's templates refuse other ids


@dataclass(frozen=True)
class CallSyntax:
    """How a model writes one call: ``open`` + ``{"name": N, ARGS_KEY: {...}}`` + ``close``.
    ``marker``: text that starts the calls anywhere in an answer ("": none); ``leading``:
    first characters of an answer that may be nothing but calls, its marker dropped;
    ``id_length``: the length of call ids the template accepts (0: any)."""

    name: str
    open: str
    close: str
    args_key: str
    marker: str = ""
    leading: str = ""
    id_length: int = 0


HERMES = CallSyntax("hermes", "<tool_call>\n", "\n</tool_call>", "arguments",
                    marker="<tool_call>")
LLAMA3 = CallSyntax("llama3", "", "", "parameters", leading="{<")
MISTRAL = CallSyntax("mistral", "[TOOL_CALLS] [", "]", "arguments", marker="[TOOL_CALLS]",
                     leading="[", id_length=9)


def _render(template: str, messages: list[dict], tools: list[dict] | None,
            add_generation_prompt: bool) -> str:
    from edge_tune.llama.engine import render_chat

    return render_chat(template, messages, tools, add_generation_prompt)


@functools.lru_cache(maxsize=32)
def syntax_of(template: str | None) -> CallSyntax | None:
    """The call syntax of chat template ``template`` (Jinja text), or None when it renders
    no tools (the probe function's name is not in the render) or its call syntax is not one
    this server parses."""
    if not template:
        return None
    tool = {"type": "function", "function": {
        "name": _PROBE, "description": "probe",
        "parameters": {"type": "object", "properties": {"edge_tune_probe_arg": {
            "type": "integer"}}}}}
    call = {"id": _PROBE_ID, "type": "function",
            "function": {"name": _PROBE, "arguments": _PROBE_ARGS}}
    user = [{"role": "user", "content": "hi"}]
    try:
        if _PROBE not in _render(template, user, [tool], True):
            return None
        turn = _render(template, [*user, {"role": "assistant", "content": "",
                                           "tool_calls": [call]}], [tool], False)
    except Exception:  # noqa: BLE001 -- a template that cannot render tools has none
        return None
    if f"<tool_call>\n{{\"name\": \"{_PROBE}\"" in turn:
        return HERMES
    if re.search(r'\[TOOL_CALLS\]\s*\[\{"name": "' + _PROBE + r'", "arguments": ', turn):
        return MISTRAL
    if re.search(r'\{"name": "' + _PROBE + r'", "parameters": ', turn):
        return LLAMA3
    return None


# --- the request -------------------------------------------------------------------------

def parse_tools(value) -> list[dict] | None:
    """OpenAI's ``tools``: a list of ``{"type": "function", "function": {"name",
    "description"?, "parameters"?, "strict"?}}``. Returns them normalised (None or [] ->
    None); 400 naming the bad entry otherwise."""
    if value is None or value == []:
        return None
    if not isinstance(value, list) or len(value) > 128:
        raise RequestError(400, "'tools': expected a list of up to 128 function tools",
                           param="tools")
    out, seen = [], set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or \
                not isinstance(fn, dict):
            raise RequestError(400, f"'{where}': expected {{\"type\": \"function\", "
                                    "\"function\": {\"name\", \"parameters\"}}", param=where)
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise RequestError(400, f"'{where}.function.name': expected 1-64 letters, digits, "
                                    "'_' or '-'", param=f"{where}.function.name")
        if name in seen:
            raise RequestError(400, f"'{where}.function.name': {name!r} is given twice",
                               param=f"{where}.function.name")
        seen.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise RequestError(400, f"'{where}.function.parameters': expected a JSON Schema "
                                    "object", param=f"{where}.function.parameters")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise RequestError(400, f"'{where}.function.description': expected a string",
                               param=f"{where}.function.description")
        clean = {"name": name}
        if desc is not None:
            clean["description"] = desc
        clean["parameters"] = params if params is not None else {"type": "object",
                                                                 "properties": {}}
        out.append({"type": "function", "function": clean})
    return out


def parse_tool_choice(value, tools: list[dict] | None) -> tuple[str, str | None]:
    """OpenAI's ``tool_choice`` -> (mode, function name): mode "auto" | "none" | "required"
    | "named". Default "auto" with tools, "none" without."""
    if value is None:
        return ("auto" if tools else "none"), None
    if value in ("auto", "none", "required"):
        if value == "required" and not tools:
            raise RequestError(400, "'tool_choice': \"required\" needs 'tools'",
                               param="tool_choice")
        return value, None
    fn = value.get("function") if isinstance(value, dict) else None
    if not isinstance(fn, dict) or value.get("type") != "function" or \
            not isinstance(fn.get("name"), str):
        raise RequestError(400, "'tool_choice': expected \"auto\", \"none\", \"required\" or "
                                "{\"type\": \"function\", \"function\": {\"name\": NAME}}",
                           param="tool_choice")
    names = [t["function"]["name"] for t in tools or []]
    if fn["name"] not in names:
        raise RequestError(400, f"'tool_choice': no tool named {fn['name']!r} in 'tools'",
                           param="tool_choice")
    return "named", fn["name"]


def history_message(message: dict, where: str) -> dict:
    """An assistant message's ``tool_calls`` as templates expect them (transformers'
    convention: ``arguments`` a mapping, not OpenAI's JSON string)."""
    calls = message.get("tool_calls")
    if calls is None:
        return message
    if not isinstance(calls, list):
        raise RequestError(400, f"'{where}.tool_calls': expected a list", param=where)
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(400, f"'{where}.tool_calls[{j}]': expected {{\"id\", \"type\": "
                                    "\"function\", \"function\": {\"name\", \"arguments\"}}",
                               param=f"{where}.tool_calls[{j}]")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise RequestError(400, f"'{where}.tool_calls[{j}].function.arguments': "
                                        "expected a JSON object (as a string)",
                                   param=f"{where}.tool_calls[{j}].function.arguments") \
                    from None
        if not isinstance(args, dict):
            raise RequestError(400, f"'{where}.tool_calls[{j}].function.arguments': expected "
                                    "a JSON object", param=f"{where}.tool_calls[{j}]"
                                                           ".function.arguments")
        out.append({"id": str(call.get("id") or f"call_{j}"), "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return {**message, "tool_calls": out}


def fit_call_ids(messages: list[dict], syntax: CallSyntax | None) -> list[dict]:
    """``messages`` with their call ids (assistant ``tool_calls[].id``, tool messages'
    ``tool_call_id``) made what ``syntax``'s template accepts: for Mistral, 9 letters or
    digits, the last 9 of the id (as vLLM does), left-padded with 0; the same id always
    maps to the same one, so a call and its result still match."""
    if syntax is None or not syntax.id_length:
        return messages
    n = syntax.id_length

    def fit(value) -> str:
        return re.sub(r"[^A-Za-z0-9]", "", str(value))[-n:].rjust(n, "0")

    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "id": fit(c["id"])} for c in m["tool_calls"]]}
        if m.get("role") == "tool" and "tool_call_id" in m:
            m = {**m, "tool_call_id": fit(m["tool_call_id"])}
        out.append(m)
    return out


# --- the answer --------------------------------------------------------------------------

def _call(name: str, args: dict, syntax: CallSyntax) -> dict:
    # ids are opaque to OpenAI clients, which send them back in the history: make them ones
    # the template accepts
    rid = uuid.uuid4().hex[:syntax.id_length] if syntax.id_length else \
        "call_" + uuid.uuid4().hex[:24]
    return {"id": rid, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def _as_call(obj, syntax: CallSyntax, names: set[str]) -> dict | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get(syntax.args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return _call(obj["name"], args, syntax) if isinstance(args, dict) else None


_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse_calls(text: str, syntax: CallSyntax, names: list[str]) -> tuple[str | None, list]:
    """The model's answer -> (content, OpenAI ``tool_calls``). Calls to functions not in
    ``names``, or that do not parse, stay in the content as text: the client sees what the
    model wrote."""
    known = set(names)
    if syntax is HERMES:
        calls, rest, last = [], [], 0
        for m in _HERMES_BLOCK.finditer(text):
            try:
                call = _as_call(json.loads(m.group(1)), syntax, known)
            except ValueError:
                call = None
            if call is None:
                continue
            calls.append(call)
            rest.append(text[last:m.start()])
            last = m.end()
        rest.append(text[last:])
        content = "".join(rest).strip() if calls else text
        return (content or None), calls
    if syntax is MISTRAL:
        return _parse_mistral(text, known)
    body = text.strip()
    body = body[len("<|python_tag|>"):].lstrip() if body.startswith("<|python_tag|>") else body
    try:
        obj, end = json.JSONDecoder().raw_decode(body)
    except ValueError:
        return (text or None), []
    call = _as_call(obj, syntax, known) if not body[end:].strip() else None
    return ((None, [call]) if call else ((text or None), []))


def _parse_mistral(text: str, known: set[str]) -> tuple[str | None, list]:
    """``TEXT [TOOL_CALLS] [CALL, ...]``, or ``[CALL, ...]`` alone (the control token left out
    of the text); one call object without its list is taken too."""
    head, tag, tail = text.partition(MISTRAL.marker)
    body = (tail if tag else text).strip()
    try:
        obj, end = json.JSONDecoder().raw_decode(body)
    except ValueError:
        return (text or None), []
    items = obj if isinstance(obj, list) else [obj]
    calls = [_as_call(item, MISTRAL, known) for item in items]
    if body[end:].strip() or not calls or None in calls:
        return (text or None), []
    return ((head.strip() if tag else "") or None), calls


class CallStream:
    """Streams an answer's plain text as it comes while holding back anything that may be
    the start of a call; :meth:`finish` parses what was held back. ``feed`` returns the
    text safe to send now."""

    def __init__(self, syntax: CallSyntax, names: list[str]) -> None:
        self.syntax = syntax
        self.names = names
        self._held = ""
        self._holding = False  # a call has (maybe) started: hold everything from here
        self._sent_any = False

    def feed(self, text: str) -> str:
        if self._holding:
            self._held += text
            return ""
        pending = self._held + text
        marker, leading = self.syntax.marker, self.syntax.leading
        start = pending.find(marker) if marker else -1
        if start >= 0:  # the calls start here
            self._holding, self._held = True, pending[start:]
            return self._sent(pending[:start])
        if leading and not self._sent_any:  # the answer may be nothing but calls
            stripped = pending.lstrip()
            if not stripped or stripped[0] in leading:
                self._holding, self._held = bool(stripped), pending
                return ""
        # hold back what may be the start of the marker
        keep = next((k for k in range(min(len(pending), len(marker) - 1), 0, -1)
                     if marker.startswith(pending[-k:])), 0)
        self._held = pending[len(pending) - keep:]
        return self._sent(pending[:len(pending) - keep])

    def _sent(self, text: str) -> str:
        self._sent_any = self._sent_any or bool(text)
        return text

    def finish(self) -> tuple[str | None, list]:
        """(content still to send, tool_calls) once the answer is complete."""
        held, self._held = self._held, ""
        if not self._holding:
            return (held or None), []
        return parse_calls(held, self.syntax, self.names)
