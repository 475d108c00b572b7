"""Adapters live: the engine a server starts with (:func:`open_serving`), per-request adapter
mixes, and adding/removing adapters while serving.

- The request field ``adapters`` (chat and text completions), edge-tune's extension, modelled
  on llama-server's ``lora`` field: ``[{"name": "a", "scale": 0.7}, {"name": "b", "scale":
  0.3}]`` applies those served adapters at those scales together (llama.cpp's
  ``llama_set_adapters_lora``: each adds ``scale * alpha / rank * B A x``); it replaces the
  adapter of ``model``, and the first adapter's chat template is used.
- ``POST /v1/adapters`` ``{"name": NAME, "path": PATH}`` loads PATH (a run directory or an
  adapter .gguf on the server's disk) as model NAME, checked exactly as ``--adapter NAME=PATH``
  at start-up (:func:`add_served_adapter`); a bad one is HTTP 400
  and nothing changes. ``DELETE /v1/adapters/NAME`` stops serving it (requests still queued
  for it get 404). Both need the API key; a server started without ``--api-key`` allows them
  only when it listens on loopback (anyone who can reach it could otherwise make it read
  files).

Starlette is imported inside functions, so importing this module stays light.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from edge_tune.errors import DataError, EdgeTuneError, UsageError
from edge_tune.events import EventSink, Log, ignore
from edge_tune.fsutil import sha256_file
from edge_tune.server.errors import RequestError, from_core
from edge_tune.server.plan import BASE, ServePlan

MAX_MIX = 8  # adapters in one request's mix
MAX_SCALE = 8.0  # |scale| accepted per adapter


def _not_served(name: str, model_names: list[str]) -> str:
    """"no adapter 'x' is served; the adapters are: a, b" (``model_names``: base first)."""
    served = [m for m in model_names if m != "base"]
    return f"no adapter {name[:200]!r} is served; " + (
        f"the adapters are: {', '.join(served)}" if served else "this server has none")


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
        if name == "base":
            raise RequestError(400, f"'{where}.name': 'base' is the model without "
                                    "adapters; leave it out of the mix", param=where)
        if name not in known_models:
            raise RequestError(404, f"'{where}.name': {_not_served(name, known_models)}",
                               param=where, code="model_not_found")
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


def load_adapter(engine, plan: ServePlan, name: str, path, on_event: EventSink = ignore) -> None:
    """Validate and load adapter ``path`` (resolved as :meth:`ServePlan.add` did) as
    ``name``, with its chat template; warn when it was trained on another base file. The
    one way adapters are loaded, at start-up and by the admin route while serving."""
    model = plan.models[name]
    engine.add_adapter(path, name)
    engine.set_chat_template(model.chat_template, name, model.stop_tokens, model.system_mode)
    engine.set_system(model.system, name)
    trained_on = engine.adapter_meta[name].get("edge_tune.base_sha256")
    if trained_on:
        plan.base_sha256 = plan.base_sha256 or sha256_file(plan.base)
        if trained_on != plan.base_sha256:
            on_event(Log(f"{path} ({name}) was trained on a different base file than "
                         f"{plan.base} (sha256 differs); its answers may be off", "warning"))


def open_serving(plan: ServePlan, on_event: EventSink = ignore, **engine_kw):
    """Load the base once and every adapter once, each validated against the base first,
    with each model's chat template (see :class:`~edge_tune.server.plan.ServedModel`)."""
    from edge_tune.llama.engine import Engine

    base = plan.models[BASE]
    engine = Engine(plan.base, chat_template=base.chat_template, stop_tokens=base.stop_tokens,
                    system_mode=base.system_mode or "keep", **engine_kw)
    engine.set_system(base.system)
    try:
        for name, model in plan.adapters.items():
            load_adapter(engine, plan, name, model.adapter, on_event)
    except BaseException:
        engine.close()
        raise
    return engine


def add_served_adapter(engine, plan: ServePlan, name: str, path: str,
                       on_event: EventSink = ignore) -> None:
    """Serve one more adapter while running (``POST /v1/adapters``): the name checked and
    the path resolved exactly as ``--adapter NAME=PATH`` is (with the server's
    ``--chat-template`` / ``--system-mode``), then :func:`load_adapter`. Call on the
    engine's thread. Raises :class:`EdgeTuneError`, with nothing changed."""
    from edge_tune import manifest as manifest_mod
    from edge_tune.adapters import resolve_chat
    from edge_tune.server import check_model_name

    check_model_name(name, setting="name")
    if name in plan.models:
        raise UsageError(f"{name!r} is already served; DELETE /v1/adapters/{name} first",
                         setting="name")
    man = manifest_mod.read(Path(path)) if Path(path).is_dir() else None
    if man is not None and man.full:
        raise DataError("a full fine-tuning run is a model of its own (no adapter); serve it "
                        "as the base of a server of its own", setting="path", value=path)
    chat_template, system_mode = plan.chat_template_option, plan.system_mode_option
    target = resolve_chat(Path(path), str(plan.base), chat_template, system_mode)
    trial = ServePlan(plan.base, base_sha256=plan.base_sha256)
    trial.override(chat_template, system_mode)
    trial.add(name, target)
    load_adapter(engine, trial, name, target.adapter, on_event)
    plan.base_sha256 = trial.base_sha256
    plan.models[name] = trial.models[name]


# The request fields of POST /v1/adapters, by the setting a core error names: the resolver
# speaks of the adapter path as the ``adapter`` setting (``--adapter PATH`` on the command line).
ADD_FIELDS = {"name": "name", "path": "path", "adapter": "path"}


def remove_served_adapter(engine, plan: ServePlan, name: str) -> None:
    """Stop serving adapter ``name`` (``DELETE /v1/adapters/NAME``); call on the engine's
    thread. Raises :class:`EdgeTuneError` for a name that is not served."""
    if name not in plan.adapters:
        raise UsageError(f"adapter {name!r} is not served")
    if any(n == name for n, _ in engine.active_mix):
        engine.activate_mix(())
    engine.remove_adapter(name)
    engine.set_system(None, name)
    del plan.models[name]


def admin_routes(scheduler, model_names: list[str], plan, api_key: str | None,
                 loopback: bool) -> list:
    """``POST /v1/adapters`` and ``DELETE /v1/adapters/{name}``. ``model_names`` is the
    app's list of served names, updated in place; ``plan`` the server's
    :class:`~edge_tune.server.plan.ServePlan`. The bearer-key check itself is the app's
    middleware (every route but /health)."""
    from starlette.responses import JSONResponse
    from starlette.routing import Route

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
            err = from_core(exc, 400, ADD_FIELDS, body, code="invalid_adapter", param="path")
            err.message = err.message[:500]
            return JSONResponse(err.body(), status_code=400)
        if name not in model_names:
            model_names.append(name)
        return JSONResponse({"object": "adapter", "id": name, "path": path}, status_code=201)

    async def remove(request) -> JSONResponse:
        if (no := refused()) is not None:
            return no
        name = request.path_params["name"]
        if name == "base":
            err = RequestError(400, "'base' is the model itself, not an adapter: it cannot be "
                                    "removed (DELETE /v1/adapters/NAME removes a served "
                                    "adapter)", param="name", code="base_not_removable")
            return JSONResponse(err.body(), status_code=400)
        if name not in model_names:
            err = RequestError(404, _not_served(name, model_names), param="name",
                               code="model_not_found")
            return JSONResponse(err.body(), status_code=404)
        model_names.remove(name)  # new requests for it get 404 from here on
        try:
            await scheduler.call(lambda engine: remove_served_adapter(engine, plan, name))
        except EdgeTuneError as exc:
            err = RequestError(404, str(exc), param="name", code="model_not_found")
            return JSONResponse(err.body(), status_code=404)
        return JSONResponse({"object": "adapter", "id": name, "deleted": True})

    return [Route("/v1/adapters", add, methods=["POST"]),
            Route("/v1/adapters/{name}", remove, methods=["DELETE"])]
