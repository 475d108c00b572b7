"""The TUI calls the core only through ``edge_tune.tui.core.Core``: the real core
(``edge_tune.api``) and the snapshot tests' stand-in (``tests/helpers/tui_fake.py``) both have every
function of it with parameters a screen's call binds to, the real core's results are the types
the Protocol names, and no screen calls (or asks about) a core function the Protocol lacks."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from pathlib import Path

import pytest

from edge_tune import api
from edge_tune.events import ignore
from edge_tune.tui.core import Core

from tests.helpers.tui_fake import FakeCore

TUI = Path(__file__).resolve().parents[2] / "tui"
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
CORES = {"edge_tune.api": api, "tests.tui_fake.FakeCore": FakeCore()}


def members() -> list[str]:
    return sorted(name for name, value in vars(Core).items()
                  if not name.startswith("_") and callable(value))


def incompatibilities(wanted: inspect.Signature, have: inspect.Signature) -> list[str]:
    """Why a call made as ``wanted`` (the Protocol's, without self) does not bind to
    ``have``; [] when every call the Protocol allows fits. Names are compared, not only
    counts: a parameter ``have`` takes under another name, or only through ``**kwargs``,
    is a mismatch."""
    found = []
    have_params = list(have.parameters.values())
    by_name = have.parameters
    for i, p in enumerate(wanted.parameters.values()):
        q = by_name.get(p.name)
        if q is None:
            found.append(f"no parameter {p.name!r}")
            continue
        if p.kind in POSITIONAL:
            if i >= len(have_params) or have_params[i].name != p.name or q.kind not in POSITIONAL:
                found.append(f"{p.name!r} is not its positional parameter {i}")
        elif q.kind not in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                            inspect.Parameter.KEYWORD_ONLY):
            found.append(f"{p.name!r} cannot be passed by keyword")
        if p.default is not inspect.Parameter.empty and q.default is inspect.Parameter.empty:
            found.append(f"{p.name!r} may be left out but has no default")
    for q in have_params:  # what the Protocol never passes must have a default
        if q.name not in wanted.parameters and q.default is inspect.Parameter.empty and \
                q.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            found.append(f"{q.name!r} is required but the screens never pass it")
    return found


def protocol_signature(name: str) -> inspect.Signature:
    sig = inspect.signature(getattr(Core, name))
    return sig.replace(parameters=list(sig.parameters.values())[1:])  # without self


def result_type(name: str):
    """The Protocol's return type for ``name`` when it is one of the core's typed results
    (a dataclass: TrainResult, ExportResult, ...), else None."""
    hint = typing.get_type_hints(getattr(Core, name)).get("return")
    return hint if dataclasses.is_dataclass(hint) else None


@pytest.mark.parametrize("core_name", list(CORES))
def test_core_has_every_protocol_function_with_a_fitting_signature(core_name):
    core = CORES[core_name]
    assert isinstance(core, Core)  # names only: runtime_checkable looks no further
    problems = {name: incompatibilities(protocol_signature(name),
                                        inspect.signature(getattr(core, name)))
                for name in members()}
    assert not {k: v for k, v in problems.items() if v}, problems


@pytest.mark.parametrize("name", [n for n in members() if result_type(n) is not None])
def test_the_real_core_returns_the_protocols_result_types(name):
    """``edge_tune.api``'s annotation names the same class (a string: the core modules use
    ``from __future__ import annotations``), and that class is the one api exports."""
    want = result_type(name)
    have = inspect.signature(getattr(api, name)).return_annotation
    assert have is want or have == want.__name__, (name, have, want)
    assert getattr(api, want.__name__) is want


def test_the_fake_core_returns_the_protocols_result_types(tmp_path):
    fake = FakeCore()
    run = Path("runs/pirate-r16")
    calls = {"train": lambda: fake.train(None, ignore),
             "export": lambda: fake.export(run, on_event=ignore),
             "verify": lambda: fake.verify(run, on_event=ignore),
             "evaluate": lambda: fake.evaluate(run, on_event=ignore),
             "resolve_chat": lambda: fake.resolve_chat(run, None)}
    assert set(calls) == {n for n in members() if result_type(n) is not None}
    for name, call in calls.items():
        assert isinstance(call(), result_type(name)), name


def core_uses() -> dict[str, list[str]]:
    """Every ``<...>.core.NAME`` and ``core.NAME`` in tui/, and every call that asks the core
    what it has (``getattr``/``hasattr``/``inspect.signature`` on it): {NAME: [FILE:LINE]}.
    The screens reach the core as ``self.core`` (BaseScreen) and the app as ``self.core``."""

    def is_core(node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id == "core" or \
            isinstance(node, ast.Attribute) and node.attr == "core"

    uses: dict[str, list[str]] = {}
    for path in sorted(TUI.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(TUI.parent)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Attribute) and is_core(node.value):
                uses.setdefault(node.attr, []).append(where)
            elif isinstance(node, ast.Call) and any(is_core(a) for a in node.args):
                func = node.func
                called = func.id if isinstance(func, ast.Name) else \
                    func.attr if isinstance(func, ast.Attribute) else ""
                if called in ("getattr", "hasattr", "signature", "setattr", "delattr", "vars",
                              "dir"):
                    uses.setdefault(f"<{called} on the core>", []).append(where)
    return uses


def test_the_screens_call_only_protocol_functions():
    uses = core_uses()
    assert {"train", "list_runs", "export", "plan"} <= set(uses), uses  # the scan sees calls
    unknown = {name: where for name, where in uses.items() if name not in members()}
    assert not unknown, f"not in edge_tune.tui.core.Core: {unknown}"
    unused = set(members()) - set(uses)
    assert not unused, f"in the Protocol but no screen calls it: {sorted(unused)}"
