"""``serve``: the base and named adapters behind the OpenAI-compatible server
(:mod:`edge_tune.server`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from edge_tune import models
from edge_tune.adapters import resolve_chat
from edge_tune.errors import UsageError
from edge_tune.events import EventSink, ignore
# open_serving: the engine a server starts with, part of the serve command's API (edge_tune.api)
from edge_tune.server.adapter_admin import open_serving  # noqa: F401
from edge_tune.server.launch import run_server
from edge_tune.server.plan import ServePlan


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


def serve(plan: ServePlan, host: str = "127.0.0.1", port: int = 8000,
          api_key: Optional[str] = None, n_ctx: int = 4096, max_queue: int = 64,
          threads: Optional[int] = None, on_event: EventSink = ignore,
          parallel: int = 4, speculative=None, feedback: Optional[Path] = None) -> None:
    """Run the OpenAI-compatible server until interrupted (blocks). ``parallel``: requests
    decoded together (continuous batching), each with ``n_ctx`` tokens of KV cache;
    ``speculative``: how answers are drafted
    (:class:`edge_tune.llama.speculative.Speculative`; None: plain decoding); ``feedback``:
    the file ``POST /v1/feedback`` appends KTO records to (None: no such route)."""
    run_server(plan, host, port, api_key, n_ctx, max_queue, threads, on_event, parallel,
               speculative, feedback)
