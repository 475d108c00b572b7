"""``serve``: the base and named adapters behind the OpenAI-compatible server
(:mod:`edge_tune.server`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from edge_tune import models
from edge_tune.adapters import resolve_chat
from edge_tune.errors import UsageError
from edge_tune.events import Done, EventSink, Log, ignore
from edge_tune.server.adapter_admin import open_serving
from edge_tune.server.plan import ServePlan, quote_system
from edge_tune.templates import choice as template_choice


def plan_serving(adapter_specs: list[str], base: Optional[str] = None,
                 chat_template: Optional[str] = None,
                 system_mode: Optional[str] = None) -> ServePlan:
    """``NAME=PATH`` specs (PATH: run dir or adapter .gguf) -> base + adapters. The base is
    ``--base``, else the first run's base, else the embedded default model. Each adapter is
    served with its run's chat template; ``chat_template`` (``--chat-template``) replaces
    every model's, and ``system_mode`` (``--system-mode``) every model's."""
    from edge_tune.server import parse_adapter_spec

    plan = ServePlan(None)  # type: ignore[arg-type] -- the base is settled below
    if base is not None:
        plan.base = resolve_chat(None, base).base
    plan.override(chat_template, system_mode)
    for spec in adapter_specs:
        name, path = parse_adapter_spec(spec)
        if name in plan.models:
            raise UsageError(f"the name {name!r} is used twice",
                             setting="adapter", value=spec)
        target = resolve_chat(Path(path), base, chat_template, system_mode)
        if target.adapter is None:  # a full fine-tuning run is a model: served as the base
            raise UsageError(f"{path} is a full fine-tuning run, a model "
                             f"of its own (no adapter): serve it with --base {path}",
                             setting="adapter", value=spec)
        plan.add(name, target)
        plan.base = plan.base or target.base
    plan.base = plan.base or models.default_gguf()
    return plan


def _check_port_free(host: str, port: int) -> None:
    import socket

    if not 1 <= port <= 65535:  # checked first: the resolver and bind() fail obscurely
        raise UsageError("expected a TCP port from 1 to 65535",
                         setting="port", value=port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve ({exc.strerror})",
                         setting="host", value=host) from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port} "
                             f"({exc.strerror}); pick another --port",
                             setting="port", value=port) from None


def serve(plan: ServePlan, host: str = "127.0.0.1", port: int = 8000,
          api_key: Optional[str] = None, n_ctx: int = 4096, max_queue: int = 64,
          threads: Optional[int] = None, on_event: EventSink = ignore,
          parallel: int = 4, speculative=None, feedback: Optional[Path] = None) -> None:
    """Run the OpenAI-compatible server until interrupted (blocks). ``parallel``: requests
    decoded together (continuous batching), each with ``n_ctx`` tokens of KV cache;
    ``speculative``: how answers are drafted
    (:class:`edge_tune.llama.speculative.Speculative`; None: plain decoding); ``feedback``:
    the file ``POST /v1/feedback`` appends KTO records to (None: no such route)."""
    try:
        import uvicorn

        from edge_tune.server.app import build_app
    except ImportError:
        raise UsageError("the server needs starlette and uvicorn: pip install "
                         "'edge-tune[run]'") from None
    from edge_tune.server import steady_malloc
    from edge_tune.server.scheduler import Scheduler

    _check_port_free(host, port)
    steady_malloc()
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        on_event(Log(f"listening on {host} without --api-key: anyone who can reach this "
                     "port can use the models", "warning"))
    engine = open_serving(plan, on_event, n_ctx=n_ctx, threads=threads, parallel=parallel)
    engine.speculative = speculative
    for name, model in plan.models.items():  # said once, at start
        if model.system:
            on_event(Log(f"{name}: a chat without a system message gets the run's training "
                         f"system prompt: {quote_system(model.system)} (a request's own "
                         "system message wins)"))
    scheduler = Scheduler(engine, max_queue=max_queue)
    names = list(plan.models)
    untemplated = [n for n in names if engine.template_of(None if n == "base" else n) is None]
    if untemplated:
        on_event(Log(f"{plan.base.name} has no chat template: /v1/chat/completions answers "
                     f"HTTP 400 for {', '.join(untemplated)} (/v1/completions works); "
                     f"{template_choice.no_template_hint()}", "warning"))
    kept = None
    if feedback is not None:
        from edge_tune.feedback import AnswerLog

        kept = {"log": AnswerLog(feedback),
                "systems": {n: m.system for n, m in plan.models.items() if m.system}}
        on_event(Log(f"feedback: POST /v1/feedback {{\"id\": ..., \"label\": true|false}} "
                     f"judges a chat answer; KTO records go to {feedback} (train --method "
                     "kto reads them)"))
    try:
        app = build_app(scheduler, names, api_key,
                        admin={"plan": plan, "loopback": host in ("127.0.0.1", "localhost",
                                                                   "::1")},
                        feedback=kept)
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
