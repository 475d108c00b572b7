"""OpenAI's request and response shapes, as plain data: parse, validate, build. No I/O.

Request bodies are checked here, before they reach the queue, so a bad body costs no engine
time and comes back as OpenAI's error object (``{"error": {"message", "type", "param",
"code"}}``) with the status OpenAI would use.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

BASE_MODEL = "base"  # the `model` name that means "no adapter"


class RequestError(Exception):
    """A request the server refuses; rendered as OpenAI's JSON error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def unknown_model(name: str, known: list[str]) -> RequestError:
    return RequestError(404, f"The model '{name}' does not exist; this server has: "
                             f"{', '.join(known)}", param="model", code="model_not_found")


@dataclass
class GenRequest:
    """One validated generation request (chat or text completion)."""

    kind: str  # "chat" | "text"
    model: str
    stream: bool
    messages: list[dict] | None = None
    prompt: str | None = None
    temperature: float = 0.7
    max_tokens: int = 256
    seed: int | None = None
    sampling: dict = field(default_factory=dict)  # top_p, stop, penalties (llama-cpp names)
    include_usage: bool = False

    @property
    def adapter(self) -> str | None:
        return None if self.model == BASE_MODEL else self.model


# Every field OpenAI documents that this server honours, can safely ignore, or refuses with a
# 400 naming it (_refuse_unsupported).
_IGNORED = {"user", "n", "logprobs", "top_logprobs", "response_format", "tools",
            "tool_choice", "parallel_tool_calls", "store", "metadata", "service_tier",
            "best_of", "echo", "suffix", "logit_bias", "modalities", "reasoning_effort",
            "functions", "function_call", "max_completion_tokens", "stream_options"}
_SAMPLING = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "stop",
             "presence_penalty", "frequency_penalty", "stream")


def _refuse_unsupported(body: dict) -> None:
    """400 for fields whose meaning this server cannot honour, rather than answering as if they
    were not sent: tool calling (not implemented yet, issue 18), a response format other than
    plain text, and log probabilities. Their "off" values (``tools: []``, ``tool_choice:
    "none"``, ``response_format: {"type": "text"}``, ``logprobs: false``) are accepted."""
    refused = {
        "tools": "tool calling is not supported by this server yet",
        "functions": "function calling is not supported by this server yet",
        "tool_choice": "tool calling is not supported by this server yet",
        "function_call": "function calling is not supported by this server yet",
        "response_format": "only plain text answers are supported (response_format "
                           "{\"type\": \"text\"})",
        "logprobs": "log probabilities are not supported by this server",
        "top_logprobs": "log probabilities are not supported by this server",
    }
    off = {"tools": ([],), "functions": ([],), "tool_choice": ("none",),
           "function_call": ("none",), "response_format": ({"type": "text"},),
           "logprobs": (False, 0), "top_logprobs": (0,)}
    for key, why in refused.items():
        value = body.get(key)
        if value is not None and not any(value == v and type(value) is type(v)
                                         for v in off[key]):
            raise RequestError(400, f"'{key}': {why}; send the request without it",
                               param=key)


def _number(body: dict, key: str, lo: float, hi: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise RequestError(400, f"'{key}': expected {kind} from {lo:g} to {hi:g}, got "
                                f"{value!r}", param=key)
    return value


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "'messages': expected a non-empty list of {role, content}",
                           param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant",
                                                            "developer", "tool"):
            raise RequestError(400, f"'messages[{i}]': expected an object with role system, "
                                    "user, assistant, developer or tool", param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            parts = [p.get("text", "") for p in content
                     if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content):
                raise RequestError(400, f"'messages[{i}].content': only text parts are "
                                        "supported", param=f"messages[{i}].content")
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise RequestError(400, f"'messages[{i}].content': expected a string",
                               param=f"messages[{i}].content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def parse_request(kind: str, body: Any, known_models: list[str]) -> GenRequest:
    """Validate a ``/v1/chat/completions`` (kind "chat") or ``/v1/completions`` (kind "text")
    body. Raises :class:`RequestError` (400 bad body, 404 unknown model)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "'model': required; one of " + ", ".join(known_models),
                           param="model")
    if model not in known_models:
        raise unknown_model(model, known_models)
    unknown = sorted(set(body) - _IGNORED - set(_SAMPLING) - {"model", "messages", "prompt"})
    if unknown:
        raise RequestError(400, f"unrecognized request argument: {unknown[0]!r}",
                           param=unknown[0])
    if body.get("n") not in (None, 1):
        raise RequestError(400, "'n': only n=1 is supported", param="n")
    _refuse_unsupported(body)
    req = GenRequest(kind=kind, model=model, stream=bool(body.get("stream", False)))
    if kind == "chat":
        req.messages = _messages(body)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(400, "'prompt': expected a string", param="prompt")
        req.prompt = prompt
    temp = _number(body, "temperature", 0, 2)
    if temp is not None:
        req.temperature = float(temp)
    limit = _number(body, "max_tokens", 1, 1 << 20, integer=True)
    limit = limit or _number(body, "max_completion_tokens", 1, 1 << 20, integer=True)
    if limit is not None:
        req.max_tokens = int(limit)
    req.seed = _number(body, "seed", -(1 << 63), (1 << 64) - 1, integer=True)
    for key in ("top_p",):
        if (v := _number(body, key, 0, 1)) is not None:
            req.sampling[key] = float(v)
    for key in ("presence_penalty", "frequency_penalty"):
        if (v := _number(body, key, -2, 2)) is not None:
            req.sampling[key] = float(v)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or \
                not all(isinstance(s, str) and s for s in stop):
            raise RequestError(400, "'stop': expected a string or a list of up to 4 strings",
                               param="stop")
        req.sampling["stop"] = stop
    opts = body.get("stream_options")
    req.include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    return req


# --- responses ---------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(req: GenRequest, rid: str, text: str, finish: str, use: dict) -> dict:
    """The whole (non-streamed) answer."""
    created = int(time.time())
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model,
            "choices": [choice], "usage": use}


def chunk(req: GenRequest, rid: str, text: str | None, finish: str | None = None,
          first: bool = False, use: dict | None = None) -> dict:
    """One streamed chunk; ``use`` alone (no choice) is the final usage chunk."""
    created = int(time.time())
    if req.kind == "chat":
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        obj = "chat.completion.chunk"
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
        obj = "text_completion"
    out = {"id": rid, "object": obj, "created": created, "model": req.model,
           "choices": [] if use is not None else choices}
    if use is not None:
        out["usage"] = use
    return out


def model_list(names: list[str], created: int) -> dict:
    return {"object": "list",
            "data": [{"id": n, "object": "model", "created": created, "owned_by": "edge-tune"}
                     for n in names]}
