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

# re-exported: callers take the error shape from here with the request shapes
from edge_tune.server.errors import RequestError, error_body, unknown_model  # noqa: F401

BASE_MODEL = "base"  # the `model` name that means "no adapter"


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
    seed: int | None = None  # as llama.cpp takes it (llama_seed)
    sampling: dict = field(default_factory=dict)  # top_p, stop, penalties (llama-cpp names)
    template_kwargs: dict | None = None  # chat_template_kwargs: variables for the template
    include_usage: bool = False
    tools: list[dict] | None = None  # OpenAI function tools, normalised (tools.parse_tools)
    tool_mode: str = "none"  # "auto" | "none" | "required" | "named"
    tool_name: str | None = None  # the function tool_choice names
    parallel_tool_calls: bool = True
    response_format: dict | None = None  # json_object / json_schema; None: plain text
    grammar: str | None = None  # GBNF text the answer must match (llama-server's "grammar")
    logprobs: int | None = None  # alternatives per token (0-20); None: no logprobs
    prompt_ids: list | None = None  # completions: the prompt as token ids (the app checks
    # them against the vocabulary and sets ``prompt`` to their text)
    echo: bool = False  # completions: the prompt is returned before the answer (with
    # its tokens' logprobs when logprobs is set); max_tokens may then be 0
    adapters: tuple = ()  # ((name, scale), ...): the request's own mix, set by the app
    # from the "adapters" field (adapter_admin.parse_adapter_mix)

    @property
    def adapter(self) -> str | None:
        return None if self.model == BASE_MODEL else self.model


# Accepted, with no effect on the answer.
_NO_EFFECT = {"user", "metadata", "store", "service_tier", "stream_options",
              "prompt_cache_key", "safety_identifier"}
_SAMPLING = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "stop",
             "presence_penalty", "frequency_penalty", "stream",
             # llama-server's (and Ollama's options'), honoured by llama.cpp's sampler
             "top_k", "min_p", "typical_p", "repeat_penalty")
_CHAT_ONLY = {"messages", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
              "functions", "function_call", "logprobs", "top_logprobs", "modalities",
              "reasoning_effort", "prediction", "audio", "web_search_options"}
_TEXT_ONLY = {"prompt", "logprobs", "best_of", "echo", "suffix"}
# adapters: edge-tune's mix (adapter_admin); response_format on completions: as llama-server
_BOTH = {"model", "n", "logit_bias", "adapters", "response_format", "grammar"}
# Fields that would change the answer and that this server cannot honour: refused with a 400
# naming them unless they hold their "off" value (compared with its type: 1 is not True).
_REFUSED = {
    "n": ((1,), "only n=1 is supported"),
    "best_of": ((1,), "only best_of=1 is supported"),
    "suffix": (("",), "insertion (suffix) is not supported"),
    "logit_bias": (({},), "logit_bias is not supported"),
    "modalities": ((["text"],), "only text output is supported"),
    "reasoning_effort": ((), "reasoning_effort is not supported"),
    "prediction": ((), "predicted outputs are not supported"),
    "audio": ((), "audio output is not supported"),
    "web_search_options": ((), "web search is not supported"),
}


def _refuse_unsupported(body: dict) -> None:
    """400 for fields whose meaning this server cannot honour, rather than answering as if
    they were not sent; their "off" values are accepted."""
    for key, (off, why) in _REFUSED.items():
        value = body.get(key)
        if value is not None and not any(value == v and type(value) is type(v) for v in off):
            raise RequestError(400, f"'{key}': {why}; send the request without it", param=key)


def _bad_text(body: Any) -> str | None:
    """The path of the first string (key or value) in ``body`` that is not valid Unicode
    text (a lone surrogate such as ``"\\ud800"``, which JSON escapes allow), else None.
    Iterative: a body may be nested deeper than Python's recursion limit."""
    stack = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(value, dict):
            for k, v in value.items():
                shown = str(k).encode("utf-8", "backslashreplace").decode("utf-8")
                where = f"{path}.{shown}" if path else shown
                stack.append((k, where))
                stack.append((v, where))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value))
    return None


def shown(number: float) -> str:
    """A bound as people write it: integers in full (1048576, not 1.04858e+06), other
    numbers short (0.5, 1e-06)."""
    if isinstance(number, int) or float(number).is_integer():
        return str(int(number))
    return f"{number:g}"


def _number(body: dict, key: str, lo: float, hi: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise RequestError(400, f"'{key}': expected {kind} from {shown(lo)} to {shown(hi)}, "
                                f"got {value!r}"[:300], param=key)
    return value


def _messages(body: dict) -> list[dict]:
    from edge_tune.server.tools import history_message

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
            parts = [p.get("text") for p in content
                     if isinstance(p, dict) and p.get("type") in ("text", "refusal")]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise RequestError(400, f"'messages[{i}].content': only text parts are "
                                        "supported", param=f"messages[{i}].content")
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise RequestError(400, f"'messages[{i}].content': expected a string",
                               param=f"messages[{i}].content")
        role = "system" if m["role"] == "developer" else m["role"]
        msg = {"role": role, "content": content}
        if role == "assistant" and m.get("tool_calls") not in (None, []):
            msg = history_message({**msg, "tool_calls": m["tool_calls"]}, f"messages[{i}]")
        if role == "assistant" and isinstance(m.get("reasoning_content"), str):
            # for the template: Qwen3's renders it in the turns after the last question
            msg["reasoning_content"] = m["reasoning_content"]
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(m.get(key), str):
                    msg[key] = m[key]
        out.append(msg)
    return out


def _response_format(body: dict) -> dict | None:
    """``response_format`` (chat and text completions): None for plain text, else the
    json_object / json_schema object (its schema is checked by grammar.py)."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object",
                                                            "json_schema"):
        raise RequestError(400, "'response_format': expected {\"type\": \"text\" | "
                                "\"json_object\" | \"json_schema\"}", param="response_format")
    return None if fmt["type"] == "text" else fmt


def _chat_fields(body: dict, req: GenRequest) -> None:
    """tools / tool_choice (and the legacy functions / function_call), response_format and
    logprobs of a chat request."""
    from edge_tune.server.tools import parse_tool_choice, parse_tools

    tools, choice = body.get("tools"), body.get("tool_choice")
    if body.get("functions") is not None:  # the legacy spelling of the same thing
        if tools is not None:
            raise RequestError(400, "'functions': give either 'tools' or 'functions'",
                               param="functions")
        fns = body["functions"]
        tools = [{"type": "function", "function": f} for f in fns] \
            if isinstance(fns, list) else fns
    if body.get("function_call") is not None and choice is None:
        call = body["function_call"]
        choice = {"type": "function", "function": call} if isinstance(call, dict) else call
    req.tools = parse_tools(tools)
    req.tool_mode, req.tool_name = parse_tool_choice(choice, req.tools)
    if req.tool_mode == "none":  # the model is not to call: it is not shown the tools
        req.tools = None
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise RequestError(400, "'parallel_tool_calls': expected true or false",
                           param="parallel_tool_calls")
    req.parallel_tool_calls = parallel is not False
    if req.response_format is not None and req.tool_mode in ("required", "named"):
        raise RequestError(400, "'response_format': cannot be combined with a tool_choice "
                                "that forces a call", param="response_format")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise RequestError(400, "'logprobs': expected true or false", param="logprobs")
    top = _number(body, "top_logprobs", 0, 20, integer=True)
    if top and not logprobs:
        raise RequestError(400, "'top_logprobs': needs \"logprobs\": true",
                           param="top_logprobs")
    if logprobs:
        req.logprobs = int(top or 0)
    req.template_kwargs = _template_kwargs(body)


# the variables llama-cpp-python's template renderer sets itself
_TEMPLATE_OWN = {"messages", "tools", "tool_choice", "functions", "function_call",
                 "eos_token", "bos_token", "raise_exception", "add_generation_prompt",
                 "strftime_now"}


def _template_kwargs(body: dict) -> dict | None:
    """``chat_template_kwargs`` (llama-server's and vLLM's field): variables the chat
    template sees, such as Qwen3's ``enable_thinking``; the names the renderer sets itself
    are refused."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        return None
    if not isinstance(kwargs, dict):
        raise RequestError(400, "'chat_template_kwargs': expected an object of template "
                                "variables, e.g. {\"enable_thinking\": false}",
                           param="chat_template_kwargs")
    for key in kwargs:
        if not key.isidentifier() or key in _TEMPLATE_OWN:
            raise RequestError(400, f"'chat_template_kwargs.{key[:100]}': "
                                    + ("set by the server" if key in _TEMPLATE_OWN else
                                       "not a template variable name"),
                               param=f"chat_template_kwargs.{key[:100]}")
    return dict(kwargs) or None


def parse_request(kind: str, body: Any, known_models: list[str]) -> GenRequest:
    """Validate a ``/v1/chat/completions`` (kind "chat") or ``/v1/completions`` (kind "text")
    body. Raises :class:`RequestError` (400 bad body, 404 unknown model)."""
    model = _model_of(body, known_models)
    known = _NO_EFFECT | set(_SAMPLING) | _BOTH | (_CHAT_ONLY if kind == "chat" else _TEXT_ONLY)
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(400, f"unrecognized request argument: {unknown[0][:100]!r}",
                           param=unknown[0][:100])
    _refuse_unsupported(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream': expected true or false", param="stream")
    req = GenRequest(kind=kind, model=model, stream=stream)
    req.response_format = _response_format(body)
    if kind == "chat":
        req.messages = _messages(body)
        _chat_fields(body, req)
    else:
        _text_fields(body, req)
    _sampling_fields(body, req)
    opts = body.get("stream_options")
    req.include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    return req


def _model_of(body: Any, known_models: list[str]) -> str:
    """The served model a body names; 400 for a body that is not a JSON object, holds text
    that is not valid Unicode, or names no model; 404 for a model not served."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    bad = _bad_text(body)
    if bad is not None:
        raise RequestError(400, f"'{bad}': not valid Unicode text (a lone surrogate "
                                "escape such as \\ud800)"[:300], param=bad[:200])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "'model': required; one of " + ", ".join(known_models),
                           param="model")
    if model not in known_models:
        raise unknown_model(model[:200], known_models)
    return model


def _text_fields(body: dict, req: GenRequest) -> None:
    """``/v1/completions``' own fields: ``prompt`` (a string or a list of token ids, or a
    list of one of them) and ``logprobs`` (0-5), ``echo``."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        req.prompt_ids, prompt = list(prompt), ""
    elif not isinstance(prompt, str) or not prompt:
        raise RequestError(400, "'prompt': expected a non-empty string or a list of token "
                                "ids", param="prompt")
    req.prompt = prompt
    top = _number(body, "logprobs", 0, 5, integer=True)
    req.logprobs = None if top is None else int(top)
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise RequestError(400, "'echo': expected true or false", param="echo")
    if echo and req.stream:
        raise RequestError(400, "'echo': not supported with \"stream\": true; send the "
                                "request unstreamed", param="echo")
    req.echo = echo


SEED_MAX = (1 << 32) - 2  # llama.cpp's seed is a uint32, and 2**32 - 1 means "random"


def llama_seed(seed: int) -> int:
    """The llama.cpp seed a request's ``seed`` (any 64-bit integer) samples with: 0 to
    :data:`SEED_MAX` as they are; any other value (negative, 2**32 - 1 and above) mapped by a
    hash into that range, so that the same seed always gives the same answer and seeds
    2**32 apart do not meet (llama.cpp would cut them to 32 bits, and read -1 and
    2**32 - 1 as "pick a random seed")."""
    if 0 <= seed <= SEED_MAX:
        return seed
    import hashlib

    digest = hashlib.blake2b(str(seed).encode(), digest_size=8, person=b"edge-tune-seed")
    return int.from_bytes(digest.digest(), "big") % (SEED_MAX + 1)


def _sampler_fields(body: dict, req: GenRequest) -> None:
    """The fields that reach llama.cpp's sampler chain (llama-cpp-python's names): top_p,
    min_p, typical_p (1: off), top_k (0 or -1: off), repeat_penalty (1: off) and the
    OpenAI presence/frequency penalties (llama.cpp counts the last 64 tokens for all
    three)."""
    for key in ("top_p", "min_p", "typical_p"):
        if (v := _number(body, key, 0, 1)) is not None:
            req.sampling[key] = float(v)
    top_k = _number(body, "top_k", -1, (1 << 31) - 1, integer=True)
    if top_k is not None:  # 0 and -1 (vLLM's spelling): no top-k cut
        req.sampling["top_k"] = max(0, int(top_k))
    repeat = _number(body, "repeat_penalty", 0, 10)
    if repeat == 0:  # llama.cpp divides by it
        raise RequestError(400, "'repeat_penalty': expected a number above 0 and up to 10 "
                                "(1: off), got 0", param="repeat_penalty")
    if repeat is not None:
        req.sampling["repeat_penalty"] = float(repeat)
    for key in ("presence_penalty", "frequency_penalty"):
        if (v := _number(body, key, -2, 2)) is not None:
            req.sampling[key] = float(v)


def _sampling_fields(body: dict, req: GenRequest) -> None:
    """The sampling fields both endpoints take: temperature, max_tokens (or
    max_completion_tokens), seed (:func:`llama_seed`), top_p, top_k, min_p, typical_p, the
    penalties, up to 4 stop strings and a GBNF ``grammar``."""
    temp = _number(body, "temperature", 0, 2)
    if temp is not None:
        req.temperature = float(temp)
    limit = _number(body, "max_tokens", 0 if req.echo else 1, 1 << 20, integer=True)
    if limit is None:
        limit = _number(body, "max_completion_tokens", 1, 1 << 20, integer=True)
    if limit is not None:
        req.max_tokens = int(limit)
    seed = _number(body, "seed", -(1 << 63), (1 << 64) - 1, integer=True)
    req.seed = None if seed is None else llama_seed(seed)
    _sampler_fields(body, req)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or \
                not all(isinstance(s, str) and s for s in stop):
            raise RequestError(400, "'stop': expected a string or a list of up to 4 strings",
                               param="stop")
        if stop:
            req.sampling["stop"] = stop
    grammar = body.get("grammar")
    if grammar is not None and (not isinstance(grammar, str) or not grammar.strip()):
        raise RequestError(400, "'grammar': expected GBNF text (a root rule)", param="grammar")
    if grammar is not None and (len(grammar) > GRAMMAR_MAX or _nesting(grammar) > NESTING_MAX):
        raise RequestError(400, f"'grammar': at most {GRAMMAR_MAX} characters and "
                                f"{NESTING_MAX} nested groups", param="grammar")
    req.grammar = grammar


# llama.cpp parses and walks a grammar recursively: a deep enough one overflows the stack
# and kills the server (100000 nested groups measured), so a request's grammar is bounded
GRAMMAR_MAX = 16384
NESTING_MAX = 200


def _nesting(gbnf: str) -> int:
    """How deep the groups ``( ... )`` of ``gbnf`` nest (outside literals and classes)."""
    depth = deepest = 0
    quote = None  # the closing character of the literal or class we are in
    escaped = False
    for ch in gbnf:
        if quote is not None:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"[":
            quote = "\"" if ch == "\"" else "]"
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
    return deepest


# --- responses ---------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(tokens: list) -> dict:
    """OpenAI's chat ``logprobs`` for :class:`~edge_tune.server.logprobs.TokenLogprob`s."""
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.bytes),
                         "top_logprobs": [{"token": a, "logprob": lp, "bytes": list(b)}
                                          for a, b, lp in t.top]} for t in tokens],
            "refusal": None}


def text_logprobs(tokens: list, offset: int = 0) -> dict:
    """The legacy completions ``logprobs``: parallel lists; ``offset``: where the first
    token's text starts in the answer."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.bytes.decode("utf-8", errors="ignore"))
    # an echoed prompt's first token has no logprob and no alternatives: None, as OpenAI's
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.top is None else {a: lp for a, _, lp in t.top}
                             for t in tokens],
            "text_offset": offsets}


def completion(req: GenRequest, rid: str, text: str | None, finish: str, use: dict,
               tool_calls: list | None = None, logprobs: list | None = None,
               reasoning: str | None = None) -> dict:
    """The whole (non-streamed) answer; ``tool_calls`` (chat): the calls parsed from it
    (``text``: what is left as content, may be None); ``logprobs``: TokenLogprob list;
    ``reasoning`` (chat): a reasoning model's thinking, as ``reasoning_content``."""
    created = int(time.time())
    if req.kind == "chat":
        message: dict = {"role": "assistant", "content": text}
        if reasoning:
            message["reasoning_content"] = reasoning
        if tool_calls:
            message["tool_calls"] = tool_calls
        choice = {"index": 0, "message": message,
                  "logprobs": None if logprobs is None else chat_logprobs(logprobs),
                  "finish_reason": "tool_calls" if tool_calls else finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text or "",
                  "logprobs": None if logprobs is None else text_logprobs(logprobs),
                  "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model,
            "choices": [choice], "usage": use}


def chunk(req: GenRequest, rid: str, text: str | None, finish: str | None = None,
          first: bool = False, use: dict | None = None, tool_calls: list | None = None,
          logprobs: list | None = None, offset: int = 0, reasoning: str | None = None) -> dict:
    """One streamed chunk; ``use`` alone (no choice) is the final usage chunk.
    ``tool_calls``: whole calls, sent as deltas with their index; ``logprobs``: the
    TokenLogprobs of this chunk (``offset``: text offset of the first, completions);
    ``reasoning`` (chat): thinking, sent as ``delta.reasoning_content``."""
    created = int(time.time())
    if req.kind == "chat":
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if reasoning:
            delta["reasoning_content"] = reasoning
        if text:
            delta["content"] = text
        if tool_calls:
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls)]
        lp = chat_logprobs(logprobs) if logprobs else None
        choices = [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]
        obj = "chat.completion.chunk"
    else:
        lp = text_logprobs(logprobs, offset) if logprobs else None
        choices = [{"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}]
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
