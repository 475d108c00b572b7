"""Adapters live: per-request adapter mixes, and adding/removing adapters while serving.

- The request field ``adapters`` (chat and text completions), edge-tune's extension, modelled
  on llama-server's ``lora`` field: ``[{"name": "a", "scale": 0.7}, {"name": "b", "scale":
  0.3}]`` applies those served adapters at those scales together (llama.cpp's
  ``llama_set_adapters_lora``: each adds ``scale * alpha / rank * B A x``); it replaces the
  adapter of ``model``, and the first adapter's chat template is used.
- ``POST /v1/adapters`` ``{"name": NAME, "path": PATH}`` loads PATH (a run directory or an
  adapter .gguf on the server's disk) as model NAME, checked exactly as ``--adapter NAME=PATH``
  at start-up (:func:`edge_tune.commands.serve.add_served_adapter`); a bad one is HTTP 400
  and nothing changes. ``DELETE /v1/adapters/NAME`` stops serving it (requests still queued
  for it get 404). Both need the API key; a server started without ``--api-key`` allows them
  only when it listens on loopback (anyone who can reach it could otherwise make it read
  files).

Starlette is imported inside functions, so importing this module stays light.
"""

from __future__ import annotations

import math
from typing import Any

from edge_tune.server.openai_shapes import RequestError, unknown_model

MAX_MIX = 8  # adapters in one request's mix
MAX_SCALE = 8.0  # |scale| accepted per adapter


def parse_adapter_mix(value: Any, known_models: list[str]) -> tuple:
    """The ``adapters`` request field -> ``((name, scale), ...)``; None/absent -> ``()``.
    Pure. Raises :class:`RequestError` 400 for a bad shape, 404 for a name not served."""
    if value is None:
        return ()
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_MIX:
        raise RequestError(400, f"'adapters': expected a list of 1 to {MAX_MIX} objects "
                                '{"name": ADAPTER, "scale": NUMBER}', param="adapters")
    mix, seen = [], set()
    for i, item in enumerate(value):
        where = f"adapters[{i}]"
        if not isinstance(item, dict) or set(item) - {"name", "scale"} or \
                not isinstance(item.get("name"), str):
            raise RequestError(400, f"'{where}': expected {{\"name\": ADAPTER, \"scale\": "
                                    "NUMBER}", param=where)
        name, scale = item["name"], item.get("scale", 1.0)
        if name == "base" or name not in known_models:
            if name == "base":
                raise RequestError(400, f"'{where}.name': 'base' is the model without "
                                        "adapters; leave it out of the mix", param=where)
            raise unknown_model(name[:200], [m for m in known_models if m != "base"])
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or \
                not math.isfinite(scale) or abs(scale) > MAX_SCALE:
            raise RequestError(400, f"'{where}.scale': expected a number from {-MAX_SCALE:g} "
                                    f"to {MAX_SCALE:g}, got {scale!r}"[:300], param=where)
        if name in seen:
            raise RequestError(400, f"'{where}.name': {name!r} is in the mix twice",
                               param=where)
        seen.add(name)
        mix.append((name, float(scale)))
    return tuple(mix)


def admin_routes(scheduler, model_names: list[str], plan, api_key: str | None,
                 loopback: bool) -> list:
    """``POST /v1/adapters`` and ``DELETE /v1/adapters/{name}``. ``model_names`` is the
    app's list of served names, updated in place; ``plan`` the server's
    :class:`~edge_tune.server.plan.ServePlan`. The bearer-key check itself is the app's
    middleware (every route but /health)."""
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from edge_tune.commands.serve import add_served_adapter, remove_served_adapter
    from edge_tune.errors import EdgeTuneError

    def refused() -> JSONResponse | None:
        if api_key or loopback:
            return None
        err = RequestError(403, "managing adapters needs the server to be started with "
                                "--api-key (or to listen on loopback only)",
                           type="permission_error", code="admin_disabled")
        return JSONResponse(err.body(), status_code=403)

    async def add(request) -> JSONResponse:
        if (no := refused()) is not None:
            return no
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict) or set(body) != {"name", "path"} or \
                not all(isinstance(body[k], str) and body[k] for k in ("name", "path")):
            err = RequestError(400, 'expected {"name": NAME, "path": RUN_DIR_OR_GGUF}')
            return JSONResponse(err.body(), status_code=400)
        name, path = body["name"], body["path"]
        try:
            await scheduler.call(lambda engine: add_served_adapter(engine, plan, name, path))
        except EdgeTuneError as exc:
            err = RequestError(400, str(exc).splitlines()[0][:500], param="path",
                               code="invalid_adapter")
            return JSONResponse(err.body(), status_code=400)
        if name not in model_names:
            model_names.append(name)
        return JSONResponse({"object": "adapter", "id": name, "path": path}, status_code=201)

    async def remove(request) -> JSONResponse:
        if (no := refused()) is not None:
            return no
        name = request.path_params["name"]
        if name == "base" or name not in model_names:
            err = unknown_model(name[:200], model_names)
            return JSONResponse(err.body(), status_code=404)
        if name in model_names:
            model_names.remove(name)  # new requests for it get 404 from here on
        try:
            await scheduler.call(lambda engine: remove_served_adapter(engine, plan, name))
        except EdgeTuneError as exc:
            err = RequestError(404, str(exc), param="name", code="model_not_found")
            return JSONResponse(err.body(), status_code=404)
        return JSONResponse({"object": "adapter", "id": name, "deleted": True})

    return [Route("/v1/adapters", add, methods=["POST"]),
            Route("/v1/adapters/{name}", remove, methods=["DELETE"])]
