"""``POST /v1/feedback``: a user's verdict on an answer the server gave (``serve --feedback
FILE``), written as a KTO record that ``train --method kto`` reads (:mod:`edge_tune.feedback`).

Request: ``{"id": "<the chat completion's id>", "label": true|false, "comment"?: "..."}``
(``label`` true: a good answer). Response 200: ``{"object": "feedback", "id": ..., "label":
..., "recorded": FILE}``. Errors are OpenAI's JSON error object: 400 for a malformed body, 404
for an id the server does not keep (never given, or older than its last 1000 answers or a
day) and on a server started without ``--feedback`` (saying so), 409 for an answer already
judged. The record's ``model`` is the request's (``base``, an adapter, or an ``adapters``
mix).

The server keeps what a verdict needs by wrapping the chat route (:func:`remembering`): the
request's messages and tools (with the run's training system prompt where the request has no
system message, as the model saw it) and the answer, for plain and streamed responses alike.
starlette is imported inside the functions.
"""

from __future__ import annotations

import json
from typing import Callable, Optional

from edge_tune.errors import UsageError
from edge_tune.feedback import MAX_COMMENT, AnswerLog
from edge_tune.server.errors import RequestError


def _prompt(body: dict, systems: dict[str, str]) -> list:
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    system = systems.get(str(body.get("model") or ""))
    if system and not any(m.get("role") in ("system", "developer") for m in messages):
        messages = [{"role": "system", "content": system}] + messages
    return messages


def _model(body: dict) -> str:
    """Who answered: the request's ``model`` (``base`` or an adapter's name), or with
    edge-tune's ``adapters`` mix its names and scales (``a*0.5+b``)."""
    mix = body.get("adapters")
    if isinstance(mix, list) and mix:
        parts = []
        for item in mix:
            name = item.get("name") if isinstance(item, dict) else item
            scale = item.get("scale", 1.0) if isinstance(item, dict) else 1.0
            parts.append(str(name) if scale == 1 else f"{name}*{scale:g}")
        return "+".join(parts)
    return str(body.get("model") or "")


class _Streamed:
    """The answer spelled by a stream of chat chunks: its id, content and tool calls."""

    def __init__(self) -> None:
        self.id: Optional[str] = None
        self.content: list[str] = []
        self.calls: dict[int, dict] = {}

    def feed(self, chunk) -> None:
        text = chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else str(chunk)
        for line in text.splitlines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            try:
                obj = json.loads(line[6:])
            except ValueError:
                continue
            self.id = obj.get("id", self.id)
            for choice in obj.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    self.content.append(delta["content"])
                for call in delta.get("tool_calls") or []:
                    into = self.calls.setdefault(call.get("index", 0), {
                        "id": call.get("id"), "type": "function",
                        "function": {"name": "", "arguments": ""}})
                    fn = call.get("function") or {}
                    into["function"]["name"] += fn.get("name") or ""
                    into["function"]["arguments"] += fn.get("arguments") or ""

    def answer(self) -> dict:
        out = {"role": "assistant", "content": "".join(self.content)}
        if self.calls:
            out["tool_calls"] = [self.calls[k] for k in sorted(self.calls)]
        return out


def remembering(handler: Callable, log: AnswerLog, systems: dict[str, str]) -> Callable:
    """``handler`` (the chat completions route) with every answer it gives kept in ``log``
    under its response id. ``systems``: model name -> the system prompt the server adds to a
    chat without one."""

    async def route(request):
        response = await handler(request)
        if response.status_code != 200:
            return response
        try:
            body = await request.json()  # starlette keeps the body it read
        except ValueError:
            return response
        prompt, tools = _prompt(body, systems), body.get("tools")
        model = _model(body)
        if body.get("stream"):
            inner, seen = response.body_iterator, _Streamed()

            async def passing():
                async for chunk in inner:
                    seen.feed(chunk)
                    yield chunk
                if seen.id:
                    log.remember(seen.id, prompt, seen.answer(), tools, model)

            response.body_iterator = passing()
            return response
        out = json.loads(response.body)
        choices = out.get("choices") or []
        if out.get("id") and len(choices) == 1:
            log.remember(out["id"], prompt, choices[0].get("message") or {}, tools, model)
        return response

    return route


def parse_verdict(body) -> tuple[str, bool, Optional[str]]:
    """(id, label, comment) of a ``/v1/feedback`` body; RequestError 400 otherwise."""
    if not isinstance(body, dict):
        raise RequestError(400, "expected a JSON object {\"id\": ..., \"label\": true|false}")
    rid, label, comment = body.get("id"), body.get("label"), body.get("comment")
    if not isinstance(rid, str) or not rid:
        raise RequestError(400, "'id': expected the id of a chat completion this server gave "
                                "(\"chatcmpl-...\")", param="id")
    if not isinstance(label, bool):
        raise RequestError(400, "'label': expected true (a good answer) or false (a bad one)",
                           param="label")
    if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT):
        raise RequestError(400, f"'comment': expected text of at most {MAX_COMMENT} "
                                "characters", param="comment")
    return rid, label, comment or None


def feedback_routes(log: AnswerLog, error: Callable) -> list:
    """The ``POST /v1/feedback`` route over ``log``; ``error`` renders a RequestError."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def feedback(request):
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            return error(RequestError(400, "the request body is not valid JSON"))
        try:
            rid, label, comment = parse_verdict(body)
            await run_in_threadpool(log.judge, rid, label, comment)  # an fsync'd append
        except RequestError as exc:
            return error(exc)
        except KeyError:
            return error(RequestError(404, f"no answer with id {rid!r} to judge: this server "
                                           f"keeps its last {log.keep} chat answers for "
                                           f"{log.seconds / 3600:g} h", param="id",
                                      code="answer_not_found"))
        except ValueError:
            return error(RequestError(409, f"answer {rid!r} is already judged", param="id"))
        except UsageError as exc:
            return error(RequestError(500, str(exc), type="server_error"))
        return JSONResponse({"object": "feedback", "id": rid, "label": label,
                             "recorded": str(log.path)})

    return [Route("/v1/feedback", feedback, methods=["POST"])]


def feedback_off_routes(error: Callable) -> list:
    """``POST /v1/feedback`` on a server started without ``--feedback``: a 404 that says how
    to turn verdicts on, not the generic "no such route"."""
    from starlette.routing import Route

    async def off(request):
        return error(RequestError(404, "this server records verdicts only when started with "
                                       "--feedback FILE (edge-tune serve ... --feedback "
                                       "feedback.jsonl)", code="feedback_off"))

    return [Route("/v1/feedback", off, methods=["POST"])]
