"""``serve``'s wiring: the port checked, the engine opened (:mod:`.adapter_admin`), the
request scheduler (:mod:`.scheduler`) and the Starlette app (:mod:`.app`) run under uvicorn
until interrupted. starlette and uvicorn are imported inside :func:`run_server`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from edge_tune.errors import UsageError
from edge_tune.events import Done, EventSink, Log, ignore
from edge_tune.server.adapter_admin import open_serving
from edge_tune.server.plan import ServePlan, quote_system
from edge_tune.templates import choice as template_choice


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


def run_server(plan: ServePlan, host: str = "127.0.0.1", port: int = 8000,
               api_key: Optional[str] = None, n_ctx: int = 4096, max_queue: int = 64,
               threads: Optional[int] = None, on_event: EventSink = ignore,
               parallel: int = 4, speculative=None, feedback: Optional[Path] = None) -> None:
    """Serve ``plan`` on ``host``:``port`` until interrupted (blocks); the arguments are
    :func:`edge_tune.commands.serve.serve`'s. Raises UsageError when starlette/uvicorn are
    missing or the port cannot be listened on."""
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
