"""Ollama's HTTP API beside the OpenAI one, on the same engine and scheduler.

Routes: ``POST /api/chat`` and ``POST /api/generate`` (streamed as NDJSON unless
``"stream": false``, as Ollama does), ``POST /api/embed`` (and the older
``/api/embeddings``), ``GET /api/tags``, ``POST /api/show``, ``GET /api/ps``,
``GET /api/version`` and ``GET /`` ("Ollama is running", which clients probe). The models are
the OpenAI API's: ``base`` and every served adapter; ``NAME:latest`` is taken as ``NAME``.

A chat or generate request is translated into the OpenAI-shaped body that
:func:`edge_tune.server.openai_shapes.parse_request` checks (``options.num_predict`` ->
``max_tokens``, ``format`` -> ``response_format``, ``think`` -> ``chat_template_kwargs``...;
:data:`OPTIONS`), so both APIs refuse and honour the same things; an error names Ollama's
field, not the OpenAI one it became, and comes back as Ollama's ``{"error": "..."}`` with
the status. ``/api/generate`` renders ``prompt`` (and ``system``) with the model's chat
template, as Ollama does; ``"raw": true`` sends it as it is. Durations are nanoseconds.

Starlette is imported inside functions, so importing this module stays light.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import time
from typing import Any, Callable

from edge_tune.server import openai_shapes as shapes
from edge_tune.server.adapter_admin import parse_adapter_mix
from edge_tune.server.errors import RequestError
from edge_tune.server.logprobs import StreamedLogprobs, covering

# The Ollama API version whose routes and fields this module speaks (clients gate features
# such as ``think`` on it).
OLLAMA_VERSION = "0.12.0"

# Ollama option -> the OpenAI / llama-server request field it becomes.
OPTIONS = {"num_predict": "max_tokens", "temperature": "temperature", "top_k": "top_k",
           "top_p": "top_p", "min_p": "min_p", "typical_p": "typical_p",
           "repeat_penalty": "repeat_penalty", "presence_penalty": "presence_penalty",
           "frequency_penalty": "frequency_penalty", "stop": "stop", "seed": "seed"}
# Options that set up a model when Ollama loads it or that do not change an answer: accepted,
# no effect (the server's model, context and threads are fixed when it starts).
NO_EFFECT_OPTIONS = {"numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv",
                     "logits_all", "vocab_only", "use_mmap", "use_mlock", "embedding_only",
                     "num_thread", "num_keep", "penalize_newline"}
# Options that would change the answer, accepted only at their "off" value (llama.cpp's
# sampler here has no mirostat or tail-free sampling; the repeat penalty's window is
# llama-cpp-python's fixed 64 tokens, Ollama's default).
OFF_OPTIONS = {"mirostat": ((0,), "mirostat sampling is not supported"),
               "tfs_z": ((1,), "tail-free sampling is not supported"),
               "repeat_last_n": ((64,), "the repeat penalty looks at the last 64 tokens, "
                                        "fixed")}
_COMMON = {"model", "stream", "format", "options", "keep_alive", "think", "logprobs",
           "top_logprobs", "adapters"}
CHAT_FIELDS = _COMMON | {"messages", "tools"}
GENERATE_FIELDS = _COMMON | {"prompt", "system", "raw", "suffix", "template", "context",
                             "images", "width", "height", "steps"}
# generate fields that would change the answer: refused unless empty
_GENERATE_REFUSED = {"suffix": "insertion (suffix) is not supported",
                     "template": "a per-request template is not supported (the server "
                                 "renders with the model's chat template or --chat-template)",
                     "context": "token context from an earlier answer is not supported; "
                                "send the conversation to /api/chat",
                     "images": "images are not supported (no vision model)",
                     "width": "image generation is not supported",
                     "height": "image generation is not supported",
                     "steps": "image generation is not supported"}
# OpenAI field (or field path prefix) -> the Ollama field it came from, for error messages;
# longest first
_OLLAMA_NAMES = sorted({**{v: f"options.{k}" for k, v in OPTIONS.items()},
                        "max_completion_tokens": "options.num_predict",
                        "response_format.json_schema.schema": "format",
                        "response_format": "format", "chat_template_kwargs": "think"}.items(),
                       key=lambda kv: -len(kv[0]))
# the ``quantization_level`` of llama.cpp's ``general.file_type`` numbers (llama.h)
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
               10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S",
               15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 21: "Q2_K_S", 32: "BF16"}
_FOREVER = "2318-11-26T00:00:00Z"  # /api/ps expires_at: served models are never unloaded


def ollama_routes(scheduler, model_names: list[str], prepare: Callable,
                  watch: Callable) -> list:
    """Starlette routes of Ollama's API over ``scheduler`` serving ``model_names`` (the list
    the OpenAI routes serve, changed in place when adapters are added or removed).
    ``prepare(req, engine)``: the app's step that turns tools / response_format / logprobs
    into sampling arguments (returns an object with ``recorder``, ``stream()`` and
    ``calls(answer)``); ``watch(request, job)``: cancels ``job`` when the client leaves."""
    from starlette.routing import Route

    api = _OllamaRoutes(scheduler, model_names, prepare, watch)
    return [
        Route("/", api.root, methods=["GET", "HEAD"]),
        Route("/api/version", api.version, methods=["GET"]),
        Route("/api/tags", api.tags, methods=["GET"]),
        Route("/api/ps", api.ps, methods=["GET"]),
        Route("/api/show", api.show, methods=["POST"]),
        Route("/api/chat", api.chat, methods=["POST"]),
        Route("/api/generate", api.generate, methods=["POST"]),
        Route("/api/embed", api.embed, methods=["POST"]),
        Route("/api/embeddings", api.embeddings, methods=["POST"]),
        Route("/api/{rest:path}", api.other,  # last: every other /api route and method
              methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    ]


def ollama_error(exc: RequestError):
    """Ollama's error shape, ``{"error": "..."}``, with the status of ``exc``."""
    from starlette.responses import Response

    return Response(json.dumps({"error": exc.message}, ensure_ascii=True),
                    status_code=exc.status, media_type="application/json")


def _now() -> str:
    """RFC 3339 time in UTC, as Ollama's ``created_at``."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


# --- requests ----------------------------------------------------------------------------------

def served_name(body: dict, model_names: list[str]) -> str:
    """The served model a body's ``model`` names (``NAME:latest`` is ``NAME``). 400 for a
    body that is not an object or names no model, 404 for a model not served. Pure."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise RequestError(400, "'model': required; one of " + ", ".join(model_names),
                           param="model")
    bare = name[:-len(":latest")] if name.endswith(":latest") else name
    if bare not in model_names:
        raise RequestError(404, f"model {name[:200]!r} not found; this server has: "
                                f"{', '.join(model_names)} (it serves adapters given with "
                                "--adapter NAME=PATH and does not pull models)",
                           param="model")
    return bare


def _check_fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(400, f"unrecognized field: {unknown[0][:100]!r}; this server "
                                f"takes {', '.join(sorted(allowed))}", param=unknown[0][:100])


def _options(body: dict, out: dict, n_ctx: int) -> None:
    """``options`` -> OpenAI sampling fields in ``out``. 400 naming an unknown option, one
    that cannot be honoured, or ``num_ctx`` over the server's context."""
    opts = body.get("options")
    if opts is None:
        opts = {}
    if not isinstance(opts, dict):
        raise RequestError(400, "'options': expected an object", param="options")
    known = set(OPTIONS) | NO_EFFECT_OPTIONS | set(OFF_OPTIONS) | {"num_ctx"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise RequestError(400, f"'options.{unknown[0][:100]}': unknown option; this server "
                                f"takes {', '.join(sorted(known))}",
                           param=f"options.{unknown[0][:100]}")
    for key, (off, why) in OFF_OPTIONS.items():
        value = opts.get(key)
        if value is not None and (isinstance(value, bool) or value not in off):
            raise RequestError(400, f"'options.{key}': {why}; send the request without it",
                               param=f"options.{key}")
    ctx = opts.get("num_ctx")
    if ctx is not None:
        if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1:
            raise RequestError(400, f"'options.num_ctx': expected a positive integer, got "
                                    f"{ctx!r}"[:300], param="options.num_ctx")
        if ctx > n_ctx:
            raise RequestError(400, f"'options.num_ctx': {ctx} is more than this server's "
                                    f"context of {n_ctx} tokens a request (its --ctx); "
                                    f"send at most {n_ctx}, or restart it with a larger "
                                    "--ctx", param="options.num_ctx")
    predict = opts.get("num_predict")
    # Ollama's -1 (no limit) and -2 (fill the context), and its default, unlimited: the
    # answer then ends at the end of the context (finish "length") at the latest
    out["max_tokens"] = 1 << 20 if predict is None or predict in (-1, -2) else predict
    for key, field in OPTIONS.items():
        if key != "num_predict" and opts.get(key) is not None:
            out[field] = opts[key]


def _format(value: Any) -> dict | None:
    """Ollama's ``format`` -> OpenAI's ``response_format`` (None: plain text)."""
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}
    raise RequestError(400, "'format': expected \"json\" or a JSON schema (an object)",
                       param="format")


def _common(body: dict, out: dict, n_ctx: int, chat_like: bool) -> None:
    """The fields /api/chat and /api/generate share, into the OpenAI body ``out``."""
    stream = body.get("stream")
    out["stream"] = True if stream is None else stream  # Ollama streams by default
    _options(body, out, n_ctx)
    if (fmt := _format(body.get("format"))) is not None:
        out["response_format"] = fmt
    keep = body.get("keep_alive")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (str, int, float))):
        raise RequestError(400, "'keep_alive': expected a duration (\"5m\", 300, -1)",
                           param="keep_alive")
    think = body.get("think")
    if think is not None:
        if not isinstance(think, bool):
            raise RequestError(400, "'think': expected true or false (thinking levels are "
                                    "not supported)", param="think")
        out["chat_template_kwargs"] = {"enable_thinking": think}
    if body.get("logprobs") is not None:
        if chat_like:
            out["logprobs"] = body["logprobs"]
            if body.get("top_logprobs") is not None:
                out["top_logprobs"] = body["top_logprobs"]
        elif body["logprobs"] is True:  # a raw prompt: the completions' "logprobs: N"
            out["logprobs"] = body.get("top_logprobs") or 0
        elif body["logprobs"] is not False:
            raise RequestError(400, "'logprobs': expected true or false", param="logprobs")
    elif body.get("top_logprobs") is not None:
        raise RequestError(400, "'top_logprobs': needs \"logprobs\": true",
                           param="top_logprobs")
    if body.get("adapters") is not None:
        out["adapters"] = body["adapters"]


def _message(i: int, m: Any) -> dict:
    """An Ollama message -> an OpenAI one: ``tool_calls`` with ids, ``tool_name`` as
    ``name``, ``thinking`` as ``reasoning_content``; images refused."""
    if not isinstance(m, dict):
        raise RequestError(400, f"'messages[{i}]': expected an object with role and content",
                           param=f"messages[{i}]")
    known = {"role", "content", "images", "thinking", "tool_calls", "tool_name",
             "tool_call_id"}
    unknown = sorted(set(m) - known)
    if unknown:
        raise RequestError(400, f"'messages[{i}].{unknown[0][:100]}': unrecognized field",
                           param=f"messages[{i}].{unknown[0][:100]}")
    if m.get("images"):
        raise RequestError(400, f"'messages[{i}].images': images are not supported (no "
                                "vision model)", param=f"messages[{i}].images")
    out = {k: m[k] for k in ("role", "content", "tool_call_id") if k in m}
    if isinstance(m.get("thinking"), str) and m["thinking"]:
        out["reasoning_content"] = m["thinking"]
    if isinstance(m.get("tool_name"), str):
        out["name"] = m["tool_name"]
    calls = m.get("tool_calls")
    if isinstance(calls, list):  # Ollama's calls carry no id and arguments as an object
        calls = [{"id": f"call_{i}_{j}", "type": "function", **c} if isinstance(c, dict)
                 else c for j, c in enumerate(calls)]
    if calls is not None:
        out["tool_calls"] = calls
    return out


def chat_body(body: dict, model: str, n_ctx: int) -> dict:
    """An /api/chat body -> the /v1/chat/completions body it asks for (its fields checked
    by :func:`parse_request` after). Pure; raises :class:`RequestError`."""
    _check_fields(body, CHAT_FIELDS)
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        raise RequestError(400, "'messages': expected a list of {role, content}",
                           param="messages")
    out: dict = {"model": model, "messages": [_message(i, m) for i, m in enumerate(msgs)]}
    _tie_tool_results(out["messages"])
    if body.get("tools") is not None:
        out["tools"] = body["tools"]
    _common(body, out, n_ctx, chat_like=True)
    return out


def _tie_tool_results(messages: list[dict]) -> None:
    """Ollama's tool results name no call id: give each the id of the next unanswered call
    of the assistant turn before it (templates that show ids then pair them)."""
    pending: list[str] = []
    for m in messages:
        if m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list):
            pending = [c.get("id") for c in m["tool_calls"] if isinstance(c, dict)]
        elif m.get("role") == "tool" and "tool_call_id" not in m and pending:
            m["tool_call_id"] = pending.pop(0)


def generate_body(body: dict, model: str, n_ctx: int) -> tuple[str, dict]:
    """An /api/generate body -> (kind, OpenAI body): a chat of ``system`` and ``prompt``
    rendered with the model's template, or with ``"raw": true`` a plain completion of
    ``prompt``. Pure; raises :class:`RequestError`."""
    _check_fields(body, GENERATE_FIELDS)
    for key, why in _GENERATE_REFUSED.items():
        if body.get(key) not in (None, "", [], 0):
            raise RequestError(400, f"'{key}': {why}; send the request without it", param=key)
    prompt, system, raw = body.get("prompt"), body.get("system"), body.get("raw")
    if not isinstance(prompt, str):
        raise RequestError(400, "'prompt': expected a string", param="prompt")
    if raw is not None and not isinstance(raw, bool):
        raise RequestError(400, "'raw': expected true or false", param="raw")
    if system is not None and not isinstance(system, str):
        raise RequestError(400, "'system': expected a string", param="system")
    if raw:
        for key in ("system", "think"):
            if body.get(key) not in (None, ""):
                raise RequestError(400, f"'{key}': not used with \"raw\": true (the prompt "
                                        "is sent as it is, without the chat template)",
                                   param=key)
        out: dict = {"model": model, "prompt": prompt}
    else:
        out = {"model": model, "messages": ([{"role": "system", "content": system}]
                                            if system else [])
               + [{"role": "user", "content": prompt}]}
    _common(body, out, n_ctx, chat_like=not raw)
    return ("text" if raw else "chat"), out


def renamed(exc: RequestError) -> RequestError:
    """``exc`` with the OpenAI field it names replaced by the Ollama field it came from
    (``max_tokens`` -> ``options.num_predict``), in its message and param."""
    param = exc.param or ""
    for openai_name, ollama_name in _OLLAMA_NAMES:
        if param == openai_name or param.startswith((openai_name + ".", openai_name + "[")):
            new = ollama_name + param[len(openai_name):]
            message = exc.message.replace(f"'{param}'", f"'{new}'", 1)
            if message == exc.message:
                message = exc.message.replace(f"'{openai_name}", f"'{ollama_name}", 1)
            return RequestError(exc.status, message, type=exc.type, param=new, code=exc.code)
    return exc


# --- the routes --------------------------------------------------------------------------------

class _OllamaRoutes:
    def __init__(self, scheduler, model_names: list[str], prepare: Callable,
                 watch: Callable) -> None:
        self.scheduler = scheduler
        self.model_names = model_names
        self.prepare = prepare
        self.watch = watch

    @property
    def engine(self):
        return self.scheduler.engine

    @property
    def n_ctx(self) -> int:
        """Tokens one request may hold (prompt + answer): the server's --ctx."""
        return self.engine.llm.sequence_tokens

    async def root(self, request):
        from starlette.responses import PlainTextResponse

        return PlainTextResponse("Ollama is running")

    async def version(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"version": OLLAMA_VERSION})

    async def tags(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"models": [self._entry(n) for n in self.model_names]})

    async def ps(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"models": [{**self._entry(n), "expires_at": _FOREVER,
                                         "size_vram": 0, "context_length": self.n_ctx}
                                        for n in self.model_names]})

    async def show(self, request):
        from starlette.responses import JSONResponse

        try:
            body = await _json(request)
            if isinstance(body, dict) and "model" not in body and "name" in body:
                body = {**body, "model": body["name"]}  # the older clients' spelling
            name = served_name(body, self.model_names)
        except RequestError as exc:
            return ollama_error(exc)
        return JSONResponse(self._show(name))

    async def other(self, request):
        path = request.url.path
        if path in {"/api/chat", "/api/generate", "/api/tags", "/api/ps", "/api/show",
                    "/api/version", "/api/embed", "/api/embeddings"}:
            return ollama_error(RequestError(405, f"{request.method} {path}: method not "
                                                  "allowed"))
        return ollama_error(RequestError(404, f"{request.method} {path}: not served here; "
                                              "this server's Ollama routes are /api/chat, "
                                              "/api/generate, /api/embed, /api/tags, "
                                              "/api/show, /api/ps, /api/version (it does not "
                                              "pull, create, copy or delete models)"))

    async def chat(self, request):
        return await self._answer(request, "chat")

    async def generate(self, request):
        return await self._answer(request, "generate")

    async def _answer(self, request, route: str):
        """One /api/chat or /api/generate request: translated, queued on the scheduler,
        answered as one object or streamed as NDJSON."""
        from starlette.responses import StreamingResponse

        started = time.perf_counter_ns()
        try:
            body = await _json(request)
            model = served_name(body, self.model_names)
            if _loads_only(body, route):  # how Ollama clients load a model
                return _loaded(body, route)
            kind, oa = ("chat", chat_body(body, model, self.n_ctx)) if route == "chat" \
                else generate_body(body, model, self.n_ctx)
            if body.get("think") is True:
                self._can_think(model)
            req = shapes.parse_request(kind, oa, self.model_names)
            req.adapters = parse_adapter_mix(oa.get("adapters"), self.model_names)
            extra = self.prepare(req, self.engine)
            job = self.scheduler.submit(req)
        except RequestError as exc:
            return ollama_error(renamed(exc))
        answer = _Render(route, body["model"], extra, started)
        watcher = asyncio.create_task(self.watch(request, job))
        try:
            first = await job.events.get()
            answer.first_piece = time.perf_counter_ns()
            if first[0] == "error":
                return ollama_error(renamed(first[1]))
            if req.stream:
                watcher.cancel()  # from here StreamingResponse watches the connection
                return StreamingResponse(_ndjson(answer, job, first),
                                         media_type="application/x-ndjson")
            return await _whole(answer, job, first)
        finally:
            if not req.stream:
                job.cancel()  # no-op when finished; stops the worker if we were cancelled
            watcher.cancel()

    def _can_think(self, model: str) -> None:
        """Refuse ``"think": true`` for a model whose chat template has no thinking markers,
        as Ollama does (400, "... does not support thinking"): the template could not switch
        thinking on, so the answer would silently be a plain one."""
        from edge_tune.llama.thinking import template_markers

        template = self.engine.template_of(None if model == shapes.BASE_MODEL else model)
        if template_markers(template or "") is None:
            raise RequestError(400, f"\"{model}\" does not support thinking (its chat "
                                    "template has no thinking markers); send the request "
                                    "without \"think\"", param="think")

    async def embed(self, request):
        return await self._embed(request, "input")

    async def embeddings(self, request):  # the older route: one "prompt", one "embedding"
        return await self._embed(request, "prompt")

    async def _embed(self, request, field: str):
        """/api/embed (``input``: a string or a list of them) or /api/embeddings
        (``prompt``): the base model's unit-length vectors, computed as /v1/embeddings does
        (:mod:`edge_tune.server.embeddings`), on a worker thread."""
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse

        from edge_tune.errors import EdgeTuneError
        from edge_tune.llama.side import InputTooLong
        from edge_tune.server.embeddings import parse_inputs

        started = time.perf_counter_ns()
        try:
            body = await _json(request)
            model = served_name(body, self.model_names)
            _check_fields(body, {"model", "options", "keep_alive", field} | (
                {"truncate", "dimensions"} if field == "input" else set()))
            _options(body, {}, self.n_ctx)  # checked; sampling options have no effect here
            raw = body.get(field)
            if raw in (None, "", []):  # nothing to embed: how clients load a model
                vectors, tokens = [], 0
            else:
                inputs, _ = parse_inputs({"model": model, "input": raw}, self.model_names,
                                         self.engine.n_vocab)
                try:
                    made = self.engine.side("embed")  # made on the event loop: one request
                except EdgeTuneError as exc:
                    raise RequestError(400, str(exc), param="model") from None
                dims = body.get("dimensions")
                if dims is not None and dims != made.dim:
                    raise RequestError(400, f"'dimensions': this model's embeddings have "
                                            f"{made.dim}; leave it out", param="dimensions")
                try:
                    vectors, tokens = await run_in_threadpool(self.engine.embed, inputs)
                except InputTooLong as exc:
                    raise RequestError(400, str(exc), param=field) from None
        except RequestError as exc:
            if exc.param and exc.param.startswith("input"):
                exc = RequestError(exc.status, exc.message.replace("'input", f"'{field}", 1),
                                   param=field + exc.param[len("input"):])
            return ollama_error(exc)
        if field == "prompt":
            return JSONResponse({"embedding": vectors[0] if vectors else []})
        return JSONResponse({"model": body["model"], "embeddings": vectors,
                             "total_duration": time.perf_counter_ns() - started,
                             "load_duration": 0, "prompt_eval_count": tokens})

    # --- model descriptions ---
    def _details(self) -> dict:
        meta = self.engine.llm.metadata
        arch = meta.get("general.architecture", "")
        ftype = meta.get("general.file_type", "")
        level = _FILE_TYPES.get(int(ftype), f"type {ftype}") if ftype.isdigit() else ""
        return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
                "parameter_size": _size_label(self._parameters()), "quantization_level": level}

    def _parameters(self) -> int:
        total = 0
        for shape in (self.engine.base.tensors or {}).values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def _entry(self, name: str) -> dict:
        """One model of /api/tags: the base file's time and size (an adapter runs on it);
        ``digest``: an identity of the base file and the name, not a content hash."""
        path = self.engine.base_path
        st = path.stat()
        ident = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{name}"
        modified = datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc)
        details = self._details()
        if name != shapes.BASE_MODEL:
            details["parent_model"] = shapes.BASE_MODEL
        return {"name": name, "model": name,
                "modified_at": modified.isoformat().replace("+00:00", "Z"),
                "size": st.st_size, "digest": hashlib.sha256(ident.encode()).hexdigest(),
                "details": details}

    def _show(self, name: str) -> dict:
        from edge_tune.llama.thinking import template_markers
        from edge_tune.server.tools import syntax_of

        engine = self.engine
        template = engine.template_of(None if name == shapes.BASE_MODEL else name) or ""
        caps = ["completion"]
        if template and syntax_of(template) is not None:
            caps.append("tools")
        if template_markers(template) is not None:
            caps.append("thinking")
        info: dict[str, Any] = {}
        for key, value in engine.llm.metadata.items():
            if key.startswith("tokenizer.chat_template"):
                continue
            info[key] = int(value) if value.isdigit() else value
        info["general.parameter_count"] = self._parameters()
        entry = self._entry(name)
        lines = ["# served by edge-tune serve", f"FROM {engine.base_path.name}"]
        if name != shapes.BASE_MODEL:
            lines.append(f"ADAPTER {name}")
        lines.append(f"PARAMETER num_ctx {self.n_ctx}")
        return {"license": "", "modelfile": "\n".join(lines) + "\n",
                "parameters": f"num_ctx {self.n_ctx}", "template": template,
                "details": entry["details"], "model_info": info, "capabilities": caps,
                "modified_at": entry["modified_at"]}


def _size_label(n: int) -> str:
    """Ollama's ``parameter_size``: "135M", "1.2B"."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


async def _json(request) -> Any:
    try:
        return await request.json()
    except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, nesting too deep
        raise RequestError(400, "the request body is not valid JSON") from None


def _loads_only(body: dict, route: str) -> bool:
    """A request with nothing to answer (no messages, an empty prompt): Ollama loads the
    model and answers ``done_reason: "load"``."""
    if route == "chat":
        return body.get("messages") in (None, [])
    return body.get("prompt") in (None, "") and not body.get("images")


def _loaded(body: dict, route: str):
    from starlette.responses import JSONResponse

    out = {"model": body["model"], "created_at": _now(), "done": True,
           "done_reason": "unload" if body.get("keep_alive") in (0, "0", "0s") else "load"}
    if route == "chat":
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    return JSONResponse(out)


# --- answers -----------------------------------------------------------------------------------

class _Render:
    """Ollama's response objects for one answer of ``route`` ("chat" | "generate"),
    requested as ``model`` at ``started`` (perf_counter_ns)."""

    def __init__(self, route: str, model: str, extra, started: int) -> None:
        self.route = route
        self.model = model
        self.extra = extra
        self.started = started
        self.first_piece = started

    def part(self, text: str, calls: list | None = None, logprobs: list | None = None,
             done: bool = False, thinking: str = "") -> dict:
        """One object: ``text`` of the answer, ``thinking`` (a reasoning model's), the
        answer's ``calls`` (OpenAI tool_calls) and the ``logprobs`` of its tokens."""
        out: dict[str, Any] = {"model": self.model, "created_at": _now()}
        if self.route == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = ollama_tool_calls(calls)
            out["message"] = message
        else:
            out["response"] = text
            if thinking:
                out["thinking"] = thinking
        if logprobs:
            out["logprobs"] = [_logprob(t) for t in logprobs]
        out["done"] = done
        return out

    def last(self, text: str, last, calls: list | None = None,
             logprobs: list | None = None, thinking: str = "") -> dict:
        """The final object: ``done``, why, token counts and durations (ns)."""
        end = time.perf_counter_ns()
        out = self.part(text, calls, logprobs, done=True, thinking=thinking)
        out.update({"done_reason": last.finish_reason, "total_duration": end - self.started,
                    "load_duration": 0, "prompt_eval_count": last.prompt_tokens,
                    "prompt_eval_duration": self.first_piece - self.started,
                    "eval_count": last.completion_tokens,
                    "eval_duration": end - self.first_piece})
        return out


def ollama_tool_calls(calls: list) -> list:
    """OpenAI ``tool_calls`` -> Ollama's (arguments as an object, the call's index)."""
    out = []
    for i, c in enumerate(calls):
        fn = c["function"]
        args = fn["arguments"]
        out.append({"id": c.get("id"), "function": {
            "index": i, "name": fn["name"],
            "arguments": json.loads(args) if isinstance(args, str) else args}})
    return out


def _logprob(t) -> dict:
    return {"token": t.text, "logprob": t.logprob, "bytes": list(t.bytes),
            "top_logprobs": [{"token": a, "logprob": lp, "bytes": list(b)}
                             for a, b, lp in t.top]}


async def _whole(answer: _Render, job, first):
    """The answer of ``job`` as one object, or the error it ended with."""
    from starlette.responses import JSONResponse

    pieces, event = await job.rest_of_answer(first)
    if event[0] == "error":
        return ollama_error(renamed(event[1]))
    last = event[1]
    whole, raw = "".join(p.text for p in pieces), "".join(p.said for p in pieces)
    thought = "".join(p.reasoning for p in pieces)
    extra = answer.extra
    content, calls = extra.calls(whole) if answer.route == "chat" else (whole, [])
    logprobs = None if extra.recorder is None else \
        covering(extra.recorder.finish(last.finish_reason, raw, last.last_token), raw)
    return JSONResponse(answer.last(content or "", last, calls, logprobs, thought))


async def _ndjson(answer: _Render, job, first):
    """One JSON object a line: a part per piece of text, then the final one with
    ``done: true`` (an error after the first line is sent as ``{"error": ...}``, as Ollama
    does). With tools, text that may start a call is held back and sent as ``tool_calls``
    once the answer is complete. Closing this generator (the client left) cancels the job."""
    extra = answer.extra
    calls = extra.stream() if answer.route == "chat" else None
    rec = None if extra.recorder is None else StreamedLogprobs(extra.recorder)

    def line(obj) -> str:
        return json.dumps(obj, ensure_ascii=False) + "\n"

    try:
        event, said = first, []
        while event[0] == "piece":
            piece = event[1]
            said.append(piece.said)
            sent = calls.feed(piece.text) if calls is not None else piece.text
            got = None if rec is None else rec.ready(len("".join(said).encode("utf-8")))
            if sent or got or piece.reasoning:
                yield line(answer.part(sent, logprobs=got, thinking=piece.reasoning))
            event = await job.events.get()
        if event[0] == "error":
            yield line({"error": renamed(event[1]).message})
            return
        last, found, rest = event[1], [], ""
        if calls is not None:
            rest, found = calls.finish()
            found = found if extra.req.parallel_tool_calls else found[:1]
        tail = None if rec is None else \
            rec.rest(last.finish_reason, "".join(said), last.last_token)
        yield line(answer.last(rest or "", last, found, tail))
    finally:
        job.cancel()

