"""The OpenAI-compatible HTTP API: a Starlette app over one :class:`Scheduler`.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (both streamed as server-sent events with ``"stream": true``).
The ``model`` field picks the adapter (``base`` = none); adapter files are fixed when the
server starts, so no request can name a file. Every error is OpenAI's JSON error object.

Structured output reaches llama.cpp through the engine's sampling arguments (llama-cpp-python
names): ``grammar`` (a ``LlamaGrammar``: response_format, forced tool calls), ``tools`` (to
the chat template), ``logits_processor`` (the logprob recorder), ``stop``.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time

from edge_tune.server import grammar as grammars
from edge_tune.server import openai_shapes as shapes
from edge_tune.server.adapter_admin import admin_routes, parse_adapter_mix
from edge_tune.server.logprobs import StreamedLogprobs, covering
from edge_tune.server.ollama_api import ollama_routes
from edge_tune.server import tools as tooling
from edge_tune.server.openai_shapes import RequestError

log = logging.getLogger("edge_tune.server")


def build_app(scheduler, model_names: list[str], api_key: str | None = None,
              admin: dict | None = None, feedback: dict | None = None):
    """The ASGI app. ``model_names`` lists ``base`` and every loaded adapter's name.
    ``admin``: ``{"plan": ServePlan, "loopback": bool}`` adds the adapter admin routes
    (:mod:`edge_tune.server.adapter_admin`). ``feedback``: ``{"log": AnswerLog, "systems":
    {model: system prompt}}`` keeps chat answers and adds ``POST /v1/feedback``
    (:mod:`edge_tune.server.feedback`)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import ClientDisconnect
    from starlette.routing import Route

    api = _Routes(scheduler, model_names)
    chat = api.chat_completions
    if feedback is not None:  # serve --feedback: answers kept for their verdicts
        from edge_tune.server.feedback import feedback_routes, remembering

        chat = remembering(chat, feedback["log"], feedback.get("systems") or {})
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/embeddings", api.embeddings, methods=["POST"]),
    ]
    if feedback is not None:
        routes += feedback_routes(feedback["log"], _error)
    else:  # a verdict sent anyway is told how to turn them on
        from edge_tune.server.feedback import feedback_off_routes

        routes += feedback_off_routes(_error)
    if admin is not None:
        routes += admin_routes(scheduler, model_names, admin["plan"], api_key,
                               admin["loopback"])
    # Ollama's API (/api/chat, /api/generate, /api/tags...) on the same scheduler
    routes += ollama_routes(scheduler, model_names, _prepare, _cancel_on_disconnect)
    middleware = [Middleware(_BearerAuth, api_key=api_key)] if api_key else []
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: _not_found,
                                         ClientDisconnect: _hung_up})


@functools.cache
def _safe_json():
    """A ``JSONResponse`` that always encodes: an error may quote request text, and ASCII
    escapes keep a stray surrogate from turning a 400 into a failed response."""
    from starlette.responses import JSONResponse

    class SafeJSON(JSONResponse):
        def render(self, content) -> bytes:
            return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()

    return SafeJSON


def _error(exc: RequestError):
    """OpenAI's JSON error object for ``exc``, with its status (401 asks for a Bearer key)."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return _safe_json()(exc.body(), status_code=exc.status, headers=headers)


class _Routes:
    """The API's route handlers over ``scheduler``, serving ``model_names``."""

    def __init__(self, scheduler, model_names: list[str]) -> None:
        self.scheduler = scheduler
        self.model_names = model_names
        self.started = int(time.time())

    async def health(self, request):
        from starlette.responses import JSONResponse

        scheduler = self.scheduler
        s = scheduler.stats
        drafts = scheduler.engine.draft_stats
        return JSONResponse({"status": "ok", "queued": scheduler.queued, "busy": s.busy,
                             "served": s.served, "cancelled": s.cancelled, "failed": s.failed,
                             "tokens_generated": s.tokens_generated,
                             "adapter_switches": s.adapter_switches,
                             "prompt_tokens": s.prompt_tokens,
                             "prompt_tokens_cached": s.prompt_tokens_cached,
                             "max_batch": s.max_batch, "decode_steps": s.decode_steps,
                             "decode_rows": s.decode_rows, "filler_rows": s.filler_rows,
                             # speculative decoding: tokens guessed, and kept (sampled)
                             "draft_tokens": drafts["drafted"], "draft_kept": drafts["kept"]})

    async def models(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse(shapes.model_list(self.model_names, self.started))

    async def chat_completions(self, request):
        return await self.generate(request, "chat")

    async def completions(self, request):
        return await self.generate(request, "text")

    async def embeddings(self, request):
        from edge_tune.server.embeddings import embeddings_route

        return await embeddings_route(request, self.scheduler.engine, self.model_names,
                                      _error)

    async def generate(self, request, kind: str):
        """One completion request of ``kind`` ("chat" or "text"): queued on the scheduler,
        answered as one JSON object or streamed as server-sent events."""
        from starlette.responses import StreamingResponse

        try:
            body = await request.json()
        except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, nesting too deep
            return _error(RequestError(400, "the request body is not valid JSON"))
        try:
            req = shapes.parse_request(kind, body, self.model_names)
            req.adapters = parse_adapter_mix(body.get("adapters"), self.model_names)
            if req.prompt_ids is not None:
                req.prompt = _prompt_text(req.prompt_ids, self.scheduler.engine)
            echoed, follow = await _echoed(req, self.scheduler.engine) if req.echo \
                else ([], None)
            if req.echo and req.max_tokens == 0:  # the prompt's logprobs alone
                return _echo_only(req, echoed)
            extra = _prepare(req, self.scheduler.engine)
            job = self.scheduler.submit(req)
        except RequestError as exc:
            return _error(exc)
        # Wait for the first event before answering, so an error found by the engine (a
        # prompt over the context) still gets its proper status; a client that leaves while
        # queued or generating cancels its job.
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            first = await job.events.get()
            if first[0] == "error":
                return _error(first[1])
            if req.stream:
                watcher.cancel()  # from here StreamingResponse watches the connection
                return StreamingResponse(_sse(req, job, first, extra),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return await _whole_answer(req, job, first, extra, kind, echoed, follow)
        finally:
            if not req.stream:
                job.cancel()  # no-op when finished; stops the worker if we were cancelled
            watcher.cancel()


async def _whole_answer(req, job, first, extra: _Extra, kind: str, echoed: list = (),
                        follow=None):
    """The answer of ``job`` as one JSON completion (from its ``first`` event on to the last),
    or the error it ended with; with ``echo``, the prompt and its ``echoed`` logprobs
    first (``follow``: see :func:`_echoed`)."""
    from starlette.responses import JSONResponse

    pieces, event = await job.rest_of_answer(first)
    if event[0] == "error":
        return _error(event[1])
    last = event[1]
    answer, raw = "".join(p.text for p in pieces), "".join(p.said for p in pieces)
    thought = "".join(p.reasoning for p in pieces)
    content, calls = extra.calls(answer)
    logprobs = None if extra.recorder is None else \
        covering(extra.recorder.finish(last.finish_reason, raw, last.last_token), raw)
    if req.echo:
        content = req.prompt + (content or "")
        if logprobs == [] and follow is not None and last.completion_tokens == 0 and \
                last.finish_reason == "stop":
            # greedy, and the first token ended the answer: it is listed, so that the echo
            # is one token longer than the prompt, as lm-eval's local-completions expects
            logprobs = [follow]
        logprobs = None if logprobs is None else list(echoed) + logprobs
    return JSONResponse(shapes.completion(
        req, shapes.new_id(kind), content, last.finish_reason,
        shapes.usage(last.prompt_tokens, last.completion_tokens), calls, logprobs,
        reasoning=thought or None))


async def _echoed(req, engine) -> tuple[list, object]:
    """(the prompt's tokens with their logprobs (``req.logprobs`` alternatives each) under
    the request's adapters, computed on the engine's scoring context in a worker thread,
    ``follow``): the list is empty when no logprobs are asked and an answer follows;
    ``follow``, for a greedy answer with logprobs, is the likeliest next token when it is a
    control token (an end of generation), else None. 400 for a prompt over the context."""
    from starlette.concurrency import run_in_threadpool

    from edge_tune.llama.side import InputTooLong
    from edge_tune.server.logprobs import prompt_logprobs
    from edge_tune.server.scheduler import adapter_mix

    if req.logprobs is None and req.max_tokens > 0:
        return [], None
    after = req.logprobs is not None and req.max_tokens > 0 and req.temperature == 0
    engine.side("score")  # made here, on the event loop: one request makes it
    try:
        got = await run_in_threadpool(
            prompt_logprobs, engine, req.prompt if req.prompt_ids is None else req.prompt_ids,
            adapter_mix(req), req.logprobs or 0, after)
    except InputTooLong as exc:
        raise RequestError(400, str(exc), param="prompt",
                           code="context_length_exceeded") from None
    follow = got.pop() if after else None
    return got, follow if follow is not None and follow.bytes == b"" else None


def _prompt_text(ids: list, engine) -> str:
    """The text of a prompt given as token ids (control tokens spelled out), which the
    answer is generated from; its echo scores the ids themselves. 400 for an id outside the
    vocabulary."""
    bad = next((t for t in ids if t >= engine.n_vocab), None)
    if bad is not None:
        raise RequestError(400, f"'prompt': token id {bad} is outside the vocabulary (0 to "
                                f"{engine.n_vocab - 1})", param="prompt")
    return b"".join(engine.token_bytes(t, True) for t in ids).decode("utf-8", errors="replace")


def _echo_only(req, echoed: list):
    """The answer to ``echo`` with ``max_tokens: 0``: the prompt, no new token."""
    from starlette.responses import JSONResponse

    return JSONResponse(shapes.completion(
        req, shapes.new_id("text"), req.prompt, "length", shapes.usage(len(echoed), 0),
        None, echoed if req.logprobs is not None else None))


async def _not_found(request, exc):
    """A Starlette HTTPException (404 and the like) as OpenAI's error object."""
    message = f"{request.method} {request.url.path}: " + (
        "no such route; see /v1/models, /v1/chat/completions, /v1/completions, /health"
        if exc.status_code == 404 else str(exc.detail))
    return _error(RequestError(exc.status_code, message))


async def _hung_up(request, exc):
    """A bare 400 where the client closed the connection before sending its whole body."""
    from starlette.responses import Response

    # Nobody is left to answer, and it is not the server's error (uvicorn would log a
    # traceback).
    log.info("%s %s: the client hung up before sending the whole request body",
             request.method, request.url.path)
    return Response(status_code=400)


async def _cancel_on_disconnect(request, job) -> None:
    """Cancel ``job`` if the client disconnects (body already read: receive() now waits)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


class _Extra:
    """What a request needs besides the text: the template's call syntax (tools) and the
    logprob recorder."""

    def __init__(self, req, syntax=None, recorder=None) -> None:
        self.req = req
        self.syntax = syntax
        self.recorder = recorder

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.req.tools or []]

    def calls(self, answer: str) -> tuple[str | None, list]:
        """(content, tool_calls) of a whole answer."""
        if self.syntax is None:
            return answer, []
        content, calls = tooling.parse_calls(answer, self.syntax, self.names)
        return content, calls if self.req.parallel_tool_calls else calls[:1]

    def stream(self):
        return None if self.syntax is None else tooling.CallStream(self.syntax, self.names)


def _prepare(req, engine) -> _Extra:
    """Turn a request's tools, response_format and logprobs into sampling arguments for the
    engine (see the module docstring). 400 for tools on a template that renders none, or a
    schema llama.cpp cannot enforce."""
    syntax, gbnf, field = None, None, "response_format"
    # the template of the request's adapter (of a mix: its first, as the engine uses)
    template = engine.template_of(req.adapters[0][0] if req.adapters else req.adapter)
    if req.messages and any(m.get("tool_calls") or m["role"] == "tool"
                            for m in req.messages):
        req.messages = tooling.fit_call_ids(req.messages, tooling.syntax_of(template))
    if req.tools:
        syntax = tooling.syntax_of(template)
        if syntax is None:
            raise RequestError(400, f"'tools': the chat template of '{req.model}' renders no "
                                    "tool calls this server can parse; restart the server "
                                    "with --chat-template qwen2|qwen3|llama3|mistral (or a "
                                    "template file with Hermes <tool_call>, Llama-3 JSON or "
                                    "Mistral [TOOL_CALLS] calls)",
                               param="tools", code="tools_not_supported")
        req.sampling["tools"] = req.tools
        if req.tool_mode in ("required", "named"):
            names = [req.tool_name] if req.tool_mode == "named" else \
                [t["function"]["name"] for t in req.tools]
            gbnf, field = grammars.tool_call_grammar(req.tools, names, syntax), "tools"
    if gbnf is None and req.response_format is not None:
        gbnf = grammars.response_format_grammar(req.response_format)
    if req.grammar is not None:
        if gbnf is not None:
            raise RequestError(400, f"'grammar': cannot be combined with {field}",
                               param="grammar")
        gbnf, field = req.grammar, "grammar"
    if gbnf is not None:
        req.sampling["grammar"] = grammars.compiled(gbnf, engine, field)
    recorder = None
    if req.logprobs is not None:
        from edge_tune.llama.engine import logits_processors
        from edge_tune.server.logprobs import LogprobRecorder

        recorder = LogprobRecorder(
            req.logprobs, engine.token_bytes,
            lambda raw: engine.tokenize(raw.decode("utf-8"), special=False))
        req.sampling["logits_processor"] = logits_processors(recorder)
    return _Extra(req, syntax, recorder)


async def _sse(req, job, first, extra: _Extra):
    """OpenAI's server-sent events: one chunk per piece, a final chunk with finish_reason,
    an optional usage chunk, then ``[DONE]``. Closing this generator (the client left)
    cancels the job, and the worker stops generating at the next token. With tools, text
    that may start a call is held back and sent as ``tool_calls`` once the answer is
    complete; logprobs go with the chunk of the tokens they describe, once the text they
    spell has been sent (text that may start a stop string is held back); a reasoning
    model's thinking goes as ``reasoning_content`` deltas."""
    rid = shapes.new_id(req.kind)
    calls = extra.stream()
    rec = None if extra.recorder is None else StreamedLogprobs(extra.recorder)
    state = {"n": 0, "offset": 0}

    def line(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def piece_chunk(text, finish=None, tool_calls=None, logprobs=None, reasoning=None):
        out = line(shapes.chunk(req, rid, text, finish, first=state["n"] == 0,
                                tool_calls=tool_calls, logprobs=logprobs,
                                offset=state["offset"], reasoning=reasoning))
        state["n"] += 1
        for t in logprobs or []:
            state["offset"] += len(t.bytes.decode("utf-8", errors="ignore"))
        return out

    try:
        event, answer, said = first, [], 0
        while event[0] == "piece":
            text = event[1].text
            answer.append(event[1].said)
            said += len(event[1].said.encode("utf-8"))
            sent = calls.feed(text) if calls is not None else text
            got = None if rec is None else rec.ready(said)
            if sent or got or event[1].reasoning:
                yield piece_chunk(sent, logprobs=got, reasoning=event[1].reasoning)
            event = await job.events.get()
        if event[0] == "error":  # the stream has started: report in-band, as OpenAI does
            yield line(event[1].body())
            return
        last = event[1]
        finish = last.finish_reason
        if calls is not None:
            rest, found = calls.finish()
            found = found if req.parallel_tool_calls else found[:1]
            if rest or found:
                yield piece_chunk(rest, tool_calls=found)
            finish = "tool_calls" if found else finish
        if rec is not None:
            tail = rec.rest(last.finish_reason, "".join(answer), last.last_token)
            if tail:
                yield piece_chunk(None, logprobs=tail)
        yield piece_chunk(None, finish)
        if req.include_usage:
            yield line(shapes.chunk(req, rid, None, use=shapes.usage(
                last.prompt_tokens, last.completion_tokens)))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


class _BearerAuth:
    """``Authorization: Bearer KEY`` on every route but ``/health`` (liveness probes)."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"")
        token = given[7:].strip() if given[:7].lower() == b"bearer " else b""
        if token and hmac.compare_digest(token, self.key):
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        msg = "Incorrect API key provided" if token else \
            "Missing API key: send 'Authorization: Bearer KEY'"
        ollama = scope["path"] == "/" or scope["path"].startswith("/api/")  # Ollama's shape
        resp = JSONResponse({"error": msg} if ollama else
                            shapes.error_body(msg, code="invalid_api_key"), status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)
