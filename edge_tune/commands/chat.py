"""``chat``: a base GGUF (and an adapter, or a mix of adapters at chosen scales) in
llama.cpp, and what ``chat --bundle`` / ``chat --compare`` / ``chat --adapter A=0.7 --adapter
B=0.3`` load and answer with."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional, Sequence, Union

from edge_tune import chat_session, models
from edge_tune.adapters import resolve_chat
from edge_tune.errors import UsageError
from edge_tune.server.adapter_admin import MAX_MIX, MAX_SCALE  # the server's bounds
from edge_tune.server.plan import BASE, ServePlan


def _scale_text(scale: float) -> str:
    return f"{scale:g}"


def parse_adapter_options(specs: Sequence[str],
                          scale: Optional[float] = None) -> list[tuple[str, float]]:
    """``chat --adapter PATH[=SCALE]... [--adapter-scale S]`` -> [(PATH, scale)], the mix
    the chat answers with (the same semantics as the server's ``adapters`` request field:
    each adapter adds ``scale * alpha / rank * B A x``). ``PATH=SCALE``: a spec that is not
    an existing path and ends in ``=NUMBER``; ``--adapter-scale`` is the scale of a single
    ``--adapter``. Scales are finite numbers in [-8, 8]; at most 8 adapters, each once.
    Raises :class:`UsageError` (one line naming the option)."""
    out: list[tuple[str, float]] = []
    for spec in specs:
        path, value = spec, None
        if "=" in spec and not Path(spec).exists():
            path, _, value = spec.rpartition("=")
        if value is not None:
            try:
                number = float(value)
            except ValueError:
                raise UsageError(f"the scale {value!r} is not a number "
                                 f"(expected PATH=SCALE, SCALE from {-MAX_SCALE:g} to "
                                 f"{MAX_SCALE:g})", setting="adapter", value=spec) from None
        else:
            number = 1.0
        if not path:
            raise UsageError("no adapter before '=' (expected PATH=SCALE)",
                             setting="adapter", value=spec)
        out.append((path, number))
    if scale is not None:
        if len(specs) != 1 or "=" in specs[0] and not Path(specs[0]).exists():
            raise UsageError("scales one --adapter; to mix several give each "
                             "its own scale: --adapter A=0.7 --adapter B=0.3",
                             setting="adapter_scale")
        out = [(out[0][0], float(scale))]
    if len(out) > MAX_MIX:
        raise UsageError(f"at most {MAX_MIX} adapters in one mix, got {len(out)}",
                         setting="adapter")
    for path, number in out:
        if not math.isfinite(number) or abs(number) > MAX_SCALE:
            raise UsageError(f"scale {_scale_text(number)} is out of range (expected a number "
                             f"from {-MAX_SCALE:g} to {MAX_SCALE:g})",
                             **({"setting": "adapter_scale"} if scale is not None else
                                {"setting": "adapter", "value": path}))
    seen = [Path(p).resolve() for p, _ in out]
    for i, path in enumerate(seen):
        if path in seen[:i]:
            raise UsageError("the same adapter twice in the mix",
                             setting="adapter", value=out[i][0])
    return out


def mix_label(labels: Sequence[tuple[str, float]]) -> str:
    """How a mix is shown: ``pirate``, ``pirate×0.7``, ``pirate×0.7 + legal×0.3``."""
    if len(labels) == 1 and labels[0][1] == 1.0:
        return labels[0][0]
    return " + ".join(f"{label}×{_scale_text(scale)}" for label, scale in labels)


def chat_plan(adapter: Union[None, str, Sequence[tuple[str, float]]], base: Optional[str],
              bundle: Optional[Path] = None, compare: Optional[str] = None,
              chat_template: Optional[str] = None,
              system_mode: Optional[str] = None) -> tuple[ServePlan, list]:
    """What ``chat`` loads and the sides it answers with, as [(label, adapter name in the
    plan, None for the base, or a mix ((name, scale), ...))] (one or two). ``adapter``: a
    run dir / adapter .gguf (a bundle's adapter name with ``bundle``), or a mix
    [(spec, scale), ...] from :func:`parse_adapter_options`; ``compare``: the second side.
    Each adapter keeps its run's chat template (a mix uses its first adapter's, as the
    server does); ``chat_template``/``system_mode`` replace every side's."""
    def side(spec: Optional[str], plan: ServePlan, slot: str, flag: str = "--adapter"):
        if spec is None or spec == "base":
            return ("base", None)
        if bundle is not None:
            if spec not in bundle_plan.adapters:
                raise UsageError("the bundle has no such adapter; it has "
                                 + ", ".join(["base", *bundle_plan.adapters]),
                                 setting="adapter", value=spec)
            plan.models[spec] = dataclasses.replace(bundle_plan.models[spec])
            return (spec, spec)
        target = resolve_chat(Path(spec), base if base else None, chat_template, system_mode)
        if target.adapter is None:  # a full fine-tuning run: a model, not an adapter
            raise UsageError(f"{flag} {spec}: a full fine-tuning run is a model of its own (no "
                             "adapter), so it cannot be mixed, scaled or compared in one chat; "
                             f"chat with it alone: --adapter {spec}")
        label = Path(spec).name
        loaded = next((n for n, m in plan.adapters.items() if m.adapter == target.adapter),
                      None)
        if loaded is not None:  # the compare side shares an adapter with the mix
            return (label, loaded)
        plan.add(slot, target)
        if plan.base is None:
            plan.base = target.base
        return (label, slot)

    plan, bundle_plan = _start_plan(base, bundle)
    if adapter is None or isinstance(adapter, str):
        sides = [side(adapter, plan, "left")]
    else:
        sides = [_mix_side([(side(spec, plan, f"left{i}" if i else "left"), scale)
                            for i, (spec, scale) in enumerate(adapter)])]
    if compare is not None:
        sides.append(_compare_side(compare, side(compare, plan, "right", "--compare"),
                                   sides[0]))
    if plan.base is None:
        plan.base = models.default_gguf()
    _base_like_the_runs(plan, sides)
    plan.override(chat_template, system_mode)
    return plan, sides


def _start_plan(base: Optional[str], bundle: Optional[Path]):
    """(the plan with its base, the bundle's own plan or None): ``--bundle``'s base and its
    served base model, else ``--base`` (None: settled by the first adapter's run)."""
    if bundle is None:
        return ServePlan(resolve_chat(None, base).base if base else None), None
    if base is not None:
        raise UsageError("chats with the bundle's own base; leave out --base",
                         setting="bundle")
    from edge_tune.bundle import load_bundle

    bundle_plan = load_bundle(bundle)
    plan = ServePlan(bundle_plan.base, base_sha256=bundle_plan.base_sha256)
    plan.models[BASE] = dataclasses.replace(bundle_plan.models[BASE])
    return plan, bundle_plan


def _mix_side(parts: list) -> tuple:
    """One side of several adapters (``parts``: ((label, name), scale) each): its label and
    the mix ((name, scale), ...), or the one adapter's name when it is alone at scale 1."""
    if len({name for (_, name), _ in parts}) < len(parts):
        raise UsageError("the same adapter twice in the mix", setting="adapter")
    mix = tuple((name, scale) for (_, name), scale in parts)
    plain = len(mix) == 1 and mix[0][1] == 1.0
    return (mix_label([(label, scale) for (label, _), scale in parts]),
            mix[0][0] if plain else mix)


def _compare_side(compare: str, other: tuple, first: tuple) -> tuple:
    """``--compare``'s side, refused when it is the first side again; labelled apart when
    the two labels are the same."""
    if chat_session.mix_of(other[1]) == chat_session.mix_of(first[1]):
        what = "model" if other[1] is None else "adapter"
        raise UsageError(f"the same {what} on both sides; "
                         "compare an adapter with 'base' or with another adapter",
                         setting="compare", value=compare)
    return (other[0] + " (2)", other[1]) if other[0] == first[0] else other


def _base_like_the_runs(plan: ServePlan, sides: list) -> None:
    """base vs adapter: the base side gets the runs' chat template and system prompt when it
    has none of its own, so only the adapter differs between the sides."""
    owners = [chat_session.Side(label, adapters).template_owner for label, adapters in sides]
    found = [plan.models[n] for n in owners if n in plan.models]
    base_model = plan.models[BASE]
    runs_template = next((m.chat_template for m in found if m.chat_template is not None), None)
    if runs_template is not None and base_model.chat_template is None:
        base_model.chat_template = runs_template
    runs_system = next((m.system for m in found if m.system is not None), None)
    if runs_system is not None and base_model.system is None:
        base_model.system = runs_system
