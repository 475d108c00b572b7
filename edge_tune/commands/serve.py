"""``serve``: the base and named adapters behind the OpenAI-compatible server
(:mod:`edge_tune.server`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from edge_tune import models, template_choice
from edge_tune.adapters import resolve_chat
from edge_tune.errors import EdgeTuneError
from edge_tune.events import Done, EventSink, Log, ignore
from edge_tune.fsutil import sha256_file
from edge_tune.server.plan import ServePlan


def plan_serving(adapter_specs: list[str], base: Optional[str] = None,
                 chat_template: Optional[str] = None,
                 system_mode: Optional[str] = None) -> ServePlan:
    """``NAME=PATH`` specs (PATH: run dir or adapter .gguf) -> base + adapters. The base is
    ``--base``, else the first run's base, else the embedded default model. Each adapter is
    served with its run's chat template; ``chat_template`` (``--chat-template``) replaces
    every model's, and ``system_mode`` (``--system-mode``) every model's."""
    from edge_tune.server import parse_adapter_spec

    plan = ServePlan(None, {})  # type: ignore[arg-type] -- the base is settled below
    if base is not None:
        plan.base = resolve_chat(None, base).base
    plan.override(chat_template, system_mode)
    for spec in adapter_specs:
        name, path = parse_adapter_spec(spec)
        if name in plan.adapters:
            raise EdgeTuneError(f"--adapter {spec}: the name {name!r} is used twice")
        target = resolve_chat(Path(path), base, chat_template, system_mode)
        plan.add(name, target)
        plan.base = plan.base or target.base
    plan.base = plan.base or models.default_gguf()
    return plan


def open_serving(plan: ServePlan, on_event: EventSink = ignore, **engine_kw):
    """Load the base once and every adapter once, each validated against the base first,
    with each model's chat template (see :class:`ServePlan`)."""
    from edge_tune.engine import Engine

    engine = Engine(plan.base, chat_template=plan.templates.get("base"),
                    stop_tokens=plan.stop_tokens.get("base", ()),
                    system_mode=plan.system_modes.get("base", "keep"), **engine_kw)
    try:
        for name, path in plan.adapters.items():
            load_adapter(engine, plan, name, path, on_event)
    except BaseException:
        engine.close()
        raise
    return engine


def load_adapter(engine, plan: ServePlan, name: str, path, on_event: EventSink = ignore) -> None:
    """Validate and load adapter ``path`` (resolved as :meth:`ServePlan.add` did) as
    ``name``, with its chat template; warn when it was trained on another base file. The
    one way adapters are loaded, at start-up and by the admin route while serving."""
    engine.add_adapter(path, name)
    engine.set_chat_template(plan.templates.get(name), name, plan.stop_tokens.get(name, ()),
                             plan.system_modes.get(name))
    trained_on = engine.adapter_meta[name].get("edge_tune.base_sha256")
    if trained_on:
        plan.base_sha256 = plan.base_sha256 or sha256_file(plan.base)
        if trained_on != plan.base_sha256:
            on_event(Log(f"{path} ({name}) was trained on a different base file than "
                         f"{plan.base} (sha256 differs); its answers may be off", "warning"))


def add_served_adapter(engine, plan: ServePlan, name: str, path: str,
                       on_event: EventSink = ignore) -> None:
    """Serve one more adapter while running (``POST /v1/adapters``): the name checked and
    the path resolved exactly as ``--adapter NAME=PATH`` is (with the server's
    ``--chat-template`` / ``--system-mode``), then :func:`load_adapter`. Call on the
    engine's thread. Raises :class:`EdgeTuneError`, with nothing changed."""
    from edge_tune.server import parse_adapter_spec

    parse_adapter_spec(f"{name}={path}")
    if name in plan.adapters:
        raise EdgeTuneError(f"adapter name {name!r} is already served; DELETE it first")
    chat_template, system_mode = plan.chat_template_option, plan.system_mode_option
    target = resolve_chat(Path(path), str(plan.base), chat_template, system_mode)
    trial = ServePlan(plan.base, {}, plan.base_sha256)
    trial.override(chat_template, system_mode)
    trial.add(name, target)
    load_adapter(engine, trial, name, target.adapter, on_event)
    plan.base_sha256 = trial.base_sha256
    for field in ("adapters", "templates", "stop_tokens", "system_modes"):
        getattr(plan, field).update(getattr(trial, field))


def remove_served_adapter(engine, plan: ServePlan, name: str) -> None:
    """Stop serving adapter ``name`` (``DELETE /v1/adapters/NAME``); call on the engine's
    thread. Raises :class:`EdgeTuneError` for a name that is not served."""
    if name not in plan.adapters:
        raise EdgeTuneError(f"adapter {name!r} is not served")
    if any(n == name for n, _ in engine.active_mix):
        engine.activate_mix(())
    engine.remove_adapter(name)
    for field in ("adapters", "templates", "stop_tokens", "system_modes"):
        getattr(plan, field).pop(name, None)


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise EdgeTuneError(f"--host {host}: cannot resolve ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise EdgeTuneError(f"--port {port}: cannot listen on {host}:{port} "
                                f"({exc.strerror}); pick another --port") from None


def serve(plan: ServePlan, host: str = "127.0.0.1", port: int = 8000,
          api_key: Optional[str] = None, n_ctx: int = 4096, max_queue: int = 64,
          threads: Optional[int] = None, on_event: EventSink = ignore) -> None:
    """Run the OpenAI-compatible server until interrupted (blocks)."""
    try:
        import uvicorn

        from edge_tune.server.app import build_app
    except ImportError:
        raise EdgeTuneError("the server needs starlette and uvicorn: pip install "
                            "'edge-tune[run]'") from None
    from edge_tune.server import steady_malloc
    from edge_tune.server.scheduler import Scheduler

    _check_port_free(host, port)
    steady_malloc()
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        on_event(Log(f"listening on {host} without --api-key: anyone who can reach this "
                     "port can use the models", "warning"))
    engine = open_serving(plan, on_event, n_ctx=n_ctx, threads=threads)
    scheduler = Scheduler(engine, max_queue=max_queue)
    names = ["base", *plan.adapters]
    untemplated = [n for n in names if engine.template_of(None if n == "base" else n) is None]
    if untemplated:
        on_event(Log(f"{plan.base.name} has no chat template: /v1/chat/completions answers "
                     f"HTTP 400 for {', '.join(untemplated)} (/v1/completions works); "
                     f"{template_choice.no_template_hint()}", "warning"))
    try:
        app = build_app(scheduler, names, api_key,
                        admin={"plan": plan, "loopback": host in ("127.0.0.1", "localhost",
                                                                   "::1")})
        shown = f"[{host}]" if ":" in host else host
        on_event(Log(f"serving {plan.base.name} as {', '.join(names)} on "
                     f"http://{shown}:{port}/v1 (Ctrl-C stops)"))
        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                access_log=False, lifespan="off")
        uvicorn.Server(config).run()
    finally:
        scheduler.close()
        engine.close()
    on_event(Done("serve", {}))
