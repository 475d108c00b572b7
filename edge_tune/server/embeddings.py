"""``POST /v1/embeddings``: OpenAI's embeddings API on the base model.

The vectors come from the engine's embedding side context (:mod:`edge_tune.llama.side`): the
base model with no adapter, pooled as its GGUF declares (mean where it declares none, as a
chat model's does) and L2-normalised, one input at a time, so a vector is the same alone or
in a list. ``input``: a string, a list of strings, a list of token ids or a list of such
lists; ``encoding_format``: ``float`` (default) or ``base64`` (little-endian float32, what the
official client asks for by default and decodes itself).
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from edge_tune.server.openai_shapes import BASE_MODEL, RequestError, unknown_model

MAX_INPUTS = 2048  # OpenAI's own bound on one request's inputs


def parse_inputs(body: Any, known_models: list[str], n_vocab: int) -> tuple[list, str]:
    """(inputs: strings or token-id lists, encoding format) of an embeddings body. 400 for
    a bad body or an adapter's name (embeddings come from the base alone), 404 for an
    unknown model."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - {"model", "input", "encoding_format", "dimensions", "user"})
    if unknown:
        raise RequestError(400, f"unrecognized request argument: {unknown[0][:100]!r}",
                           param=unknown[0][:100])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "'model': required; embeddings come from 'base'",
                           param="model")
    if model not in known_models:
        raise unknown_model(model[:200], known_models)
    if model != BASE_MODEL:
        raise RequestError(400, f"'model': embeddings come from the base model alone, not "
                                f"an adapter; send \"model\": \"{BASE_MODEL}\"", param="model")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise RequestError(400, "'encoding_format': expected \"float\" or \"base64\"",
                           param="encoding_format")
    return _inputs(body.get("input"), n_vocab), fmt


def _inputs(raw: Any, n_vocab: int) -> list:
    if isinstance(raw, str) or (isinstance(raw, list) and raw and
                                all(isinstance(t, int) and not isinstance(t, bool)
                                    for t in raw)):
        raw = [raw]
    if not isinstance(raw, list) or not raw or len(raw) > MAX_INPUTS:
        raise RequestError(400, f"'input': expected a non-empty string, a list of up to "
                                f"{MAX_INPUTS} strings, or token ids", param="input")
    for i, item in enumerate(raw):
        if isinstance(item, str):
            ok = bool(item)
        else:
            ok = isinstance(item, list) and bool(item) and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab
                for t in item)
        if not ok:
            raise RequestError(400, f"'input[{i}]': expected a non-empty string or a list of "
                                    f"token ids from 0 to {n_vocab - 1}", param=f"input[{i}]")
    return raw


def response(vectors: list[list[float]], fmt: str, model: str, tokens: int) -> dict:
    """OpenAI's embeddings list: ``data[i] = {"object": "embedding", "index": i,
    "embedding": [...] or base64}`` and ``usage`` (prompt and total tokens)."""
    data = []
    for i, vec in enumerate(vectors):
        emb: Any = vec
        if fmt == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


async def embeddings_route(request, engine, known_models: list[str], error):
    """The route handler: parse, embed on a worker thread, answer; ``error`` turns a
    :class:`RequestError` into the response (OpenAI's error object)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    from edge_tune.errors import EdgeTuneError
    from edge_tune.llama.side import InputTooLong

    try:
        body = await request.json()
    except (ValueError, RecursionError):
        return error(RequestError(400, "the request body is not valid JSON"))
    try:
        inputs, fmt = parse_inputs(body, known_models, engine.n_vocab)
        dims = body.get("dimensions")
        try:
            engine.side("embed")  # made here, on the event loop: one request makes it
        except EdgeTuneError as exc:
            raise RequestError(400, str(exc), param="model") from None
        if dims is not None and dims != engine.side("embed").dim:
            raise RequestError(400, f"'dimensions': this model's embeddings have "
                                    f"{engine.side('embed').dim}; leave it out",
                               param="dimensions")
        try:
            vectors, tokens = await run_in_threadpool(engine.embed, inputs)
        except InputTooLong as exc:
            raise RequestError(400, str(exc), param="input",
                               code="context_length_exceeded") from None
    except RequestError as exc:
        return error(exc)
    return JSONResponse(response(vectors, fmt, BASE_MODEL, tokens))
