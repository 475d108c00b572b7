"""The OpenAI-compatible HTTP API: a Starlette app over one :class:`Scheduler`.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (both streamed as server-sent events with ``"stream": true``).
The ``model`` field picks the adapter (``base`` = none); adapter files are fixed when the
server starts, so no request can name a file. Every error is OpenAI's JSON error object.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

from edge_tune.server import openai_shapes as shapes
from edge_tune.server.openai_shapes import RequestError


def build_app(scheduler, model_names: list[str], api_key: str | None = None):
    """The ASGI app. ``model_names`` lists ``base`` and every loaded adapter's name."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    started = int(time.time())

    def error(exc: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def health(request: Request) -> JSONResponse:
        s = scheduler.stats
        return JSONResponse({"status": "ok", "queued": scheduler.queued, "busy": s.busy,
                             "served": s.served, "cancelled": s.cancelled, "failed": s.failed,
                             "tokens_generated": s.tokens_generated,
                             "adapter_switches": s.adapter_switches})

    async def models(request: Request) -> JSONResponse:
        return JSONResponse(shapes.model_list(model_names, started))

    async def chat_completions(request: Request):
        return await generate(request, "chat")

    async def completions(request: Request):
        return await generate(request, "text")

    async def generate(request: Request, kind: str):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(RequestError(400, "the request body is not valid JSON"))
        try:
            req = shapes.parse_request(kind, body, model_names)
            job = scheduler.submit(req)
        except RequestError as exc:
            return error(exc)
        # Wait for the first event before answering, so an error found by the engine (a
        # prompt over the context) still gets its proper status; a client that leaves while
        # queued or generating cancels its job.
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            first = await job.events.get()
            if first[0] == "error":
                return error(first[1])
            if req.stream:
                watcher.cancel()  # from here StreamingResponse watches the connection
                return StreamingResponse(_sse(req, job, first), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            text, event = [], first
            while event[0] == "piece":
                text.append(event[1].text)
                event = await job.events.get()
            if event[0] == "error":
                return error(event[1])
            last = event[1]
            return JSONResponse(shapes.completion(
                req, shapes.new_id(kind), "".join(text), last.finish_reason,
                shapes.usage(last.prompt_tokens, last.completion_tokens)))
        finally:
            if not req.stream:
                job.cancel()  # no-op when finished; stops the worker if we were cancelled
            watcher.cancel()

    async def not_found(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: " + (
            "no such route; see /v1/models, /v1/chat/completions, /v1/completions, /health"
            if exc.status_code == 404 else str(exc.detail))
        return error(RequestError(exc.status_code, message))

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    middleware = [Middleware(_BearerAuth, api_key=api_key)] if api_key else []
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: not_found})


async def _cancel_on_disconnect(request, job) -> None:
    """Cancel ``job`` if the client disconnects (body already read: receive() now waits)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


async def _sse(req, job, first):
    """OpenAI's server-sent events: one chunk per piece, a final chunk with finish_reason,
    an optional usage chunk, then ``[DONE]``. Closing this generator (the client left)
    cancels the job, and the worker stops generating at the next token."""
    rid = shapes.new_id(req.kind)

    def line(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        event, n = first, 0
        while event[0] == "piece":
            yield line(shapes.chunk(req, rid, event[1].text, first=n == 0))
            n += 1
            event = await job.events.get()
        if event[0] == "error":  # the stream has started: report in-band, as OpenAI does
            yield line(event[1].body())
            return
        last = event[1]
        yield line(shapes.chunk(req, rid, None, last.finish_reason, first=n == 0))
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
        resp = JSONResponse(shapes.error_body(msg, code="invalid_api_key"), status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)
