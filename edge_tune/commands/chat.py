"""``chat``: a base GGUF (and an adapter) in llama.cpp, and what ``chat --bundle`` /
``chat --compare`` load and answer with."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

from edge_tune import models
from edge_tune.adapters import ChatTarget, resolve_chat
from edge_tune.chat_session import ChatSession, Token
from edge_tune.errors import EdgeTuneError
from edge_tune.events import EventSink, Log, ignore
from edge_tune.fsutil import sha256_file
from edge_tune.server.plan import ServePlan


def open_engine(target: ChatTarget, on_event: EventSink = ignore, **engine_kw):
    """Load the base in llama.cpp and activate the (validated) adapter, if any."""
    from edge_tune.engine import Engine

    engine = Engine(target.base, chat_template=target.chat_template.text if
                    target.chat_template else None, stop_tokens=target.stop_tokens,
                    system_mode=target.system_mode, **engine_kw)
    if target.adapter is not None:
        try:
            engine.add_adapter(target.adapter, "adapter")
            engine.activate("adapter")
        except BaseException:
            engine.close()
            raise
        trained_on = engine.adapter_meta["adapter"].get("edge_tune.base_sha256")
        if trained_on and trained_on != sha256_file(target.base):
            on_event(Log(f"{target.adapter} was trained on a different base file than "
                         f"{target.base} (sha256 differs); answers may be off", "warning"))
    return engine


def chat_once(target: ChatTarget, prompt: str, system: Optional[str] = None,
              temperature: float = 0.7, max_tokens: int = 256) -> Iterator[str]:
    """One answer to ``prompt``, streamed as text pieces (a :class:`ChatSession` of one
    message); the engine is closed afterwards."""
    engine = open_engine(target)
    try:
        session = ChatSession(engine, system=system, temperature=temperature,
                              max_tokens=max_tokens)
        yield from (e.text for e in session.ask(prompt) if isinstance(e, Token))
    finally:
        engine.close()


def chat_plan(adapter: Optional[str], base: Optional[str], bundle: Optional[Path] = None,
              compare: Optional[str] = None, chat_template: Optional[str] = None,
              system_mode: Optional[str] = None) -> tuple[ServePlan, list]:
    """For ``chat --bundle`` / ``chat --compare``: what to load, and the sides to answer
    with, as [(label, adapter name in the plan or None for the base)] (one or two). Each side
    keeps its run's chat template; ``chat_template``/``system_mode`` replace every side's."""
    def side(spec: Optional[str], plan: ServePlan, slot: str):
        if spec is None or spec == "base":
            return ("base", None)
        if bundle is not None:
            if spec not in bundle_plan.adapters:
                raise EdgeTuneError(f"--adapter {spec}: the bundle has no such adapter; it has "
                                    + ", ".join(["base", *bundle_plan.adapters]))
            plan.adapters[spec] = bundle_plan.adapters[spec]
            for table in ("templates", "stop_tokens", "system_modes"):
                if spec in getattr(bundle_plan, table):
                    getattr(plan, table)[spec] = getattr(bundle_plan, table)[spec]
            return (spec, spec)
        target = resolve_chat(Path(spec), base if base else None, chat_template, system_mode)
        label = Path(spec).name
        if any(path == target.adapter for path in plan.adapters.values()):
            raise EdgeTuneError(f"--compare {spec}: the same adapter on both sides")
        plan.add(slot, target)
        if plan.base is None:
            plan.base = target.base
        return (label, slot)

    if bundle is not None:
        if base is not None:
            raise EdgeTuneError("--bundle: chats with the bundle's own base; leave out --base")
        from edge_tune.bundle import load_bundle

        bundle_plan = load_bundle(bundle)
        plan = ServePlan(bundle_plan.base, {}, bundle_plan.base_sha256)
        for table in ("templates", "stop_tokens", "system_modes"):
            if "base" in getattr(bundle_plan, table):
                getattr(plan, table)["base"] = getattr(bundle_plan, table)["base"]
    else:
        plan = ServePlan(resolve_chat(None, base).base if base else None, {})
    sides = [side(adapter, plan, "left")]
    if compare is not None:
        other = side(compare, plan, "right")
        if other[1] == sides[0][1]:
            raise EdgeTuneError(f"--compare {compare}: the same model on both sides; compare "
                                "an adapter with 'base' or with another adapter")
        if other[0] == sides[0][0]:
            other = (other[0] + " (2)", other[1])
        sides.append(other)
    if plan.base is None:
        plan.base = models.default_gguf()
    runs_template = next((plan.templates[n] for _, n in sides if n in plan.templates), None)
    if runs_template is not None and "base" not in plan.templates:
        # base vs adapter: the same template on both sides, so only the adapter differs
        plan.templates["base"] = runs_template
    plan.override(chat_template, system_mode)
    return plan, sides
