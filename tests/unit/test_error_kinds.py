"""Every user-facing error is raised as a kind that says what went wrong (edge_tune.errors):
never the base class itself, and every kind defined in edge_tune/ or converters/ derives from
a kind listed in the one exit-code table. Settings are named by the core and spelled by each
front end (``--seq-len`` on the command line, ``'path'`` over HTTP)."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

from edge_tune import errors
from edge_tune.errors import (EXIT_CODES, DataError, EdgeTuneError, ExitCode, Unsupported,
                              UsageError, cli_spelling, spelled)

REPO = Path(__file__).resolve().parents[2]
SOURCES = ["edge_tune", "converters", "tui"]


def bare_errors(path: Path, root: Path = REPO) -> list[str]:
    """``EdgeTuneError(...)`` calls (a raise, or an error made to be raised later) in one
    file, as ``path:line``; edge_tune/errors.py itself is where the base class may be made."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else getattr(f, "attr", "")
            if name == "EdgeTuneError":
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_no_plain_edge_tune_error_is_raised():
    found = [hit for src in SOURCES for path in sorted((REPO / src).rglob("*.py"))
             if path != REPO / "edge_tune" / "errors.py" for hit in bare_errors(path)]
    assert not found, ("raise the kind that says what went wrong (UsageError, DataError, "
                       "Unsupported, ... in edge_tune/errors.py), not EdgeTuneError:\n"
                       + "\n".join(found))


def test_the_scan_sees_a_plain_error(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("raise EdgeTuneError('x')\nraise DataError('fine')\n"
                   "bad = errors.EdgeTuneError('y')\nexcept_ok = isinstance(e, EdgeTuneError)\n")
    assert [hit.split(":")[1] for hit in bare_errors(bad, tmp_path)] == ["1", "3"]


def test_kinds_defined_elsewhere_derive_from_a_listed_kind():
    """A class deriving from EdgeTuneError outside errors.py takes a listed kind's code; each
    of them is named in errors.py's table (the docstring) so the table stays the one list."""
    doc = errors.__doc__ or ""
    listed = {k.__name__ for k in EXIT_CODES} - {"EdgeTuneError"}
    on_base, unlisted = [], []
    for src in SOURCES:
        for path in sorted((REPO / src).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ClassDef) and path != REPO / "edge_tune" / "errors.py":
                    bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                    where = f"{path.relative_to(REPO)}: {node.name}"
                    if "EdgeTuneError" in bases:
                        on_base.append(where)
                    elif bases & listed and node.name not in doc:
                        unlisted.append(where)
    assert not on_base, ("derive from a kind (UsageError, DataError, ...), not the base:\n"
                         + "\n".join(on_base))
    assert not unlisted, "name it in errors.py's table of kinds:\n" + "\n".join(unlisted)
    for kind in EXIT_CODES:
        assert kind.__name__ in doc, f"{kind.__name__} is missing from errors.py's table"


def test_a_setting_is_spelled_by_each_front_end():
    exc = UsageError("expected NAME=PATH", setting="adapter", value="x=")
    assert str(exc) == "--adapter x=: expected NAME=PATH"  # the command line's line
    assert exc.detail == "expected NAME=PATH" and exc.setting == "adapter"
    assert spelled(exc, "'path'") == "'path' x=: expected NAME=PATH"
    assert spelled(exc, "'path'", value="runs/a/") == "'path' runs/a/: expected NAME=PATH"
    assert spelled(exc, None) == "expected NAME=PATH"
    no_value = DataError("a LoRA setting", setting="target_modules")
    assert str(no_value) == "--target-modules: a LoRA setting"
    assert cli_spelling("seq_len") == "--seq-len"
    plain = DataError("run.toml: bad\nline")
    assert str(plain) == plain.detail == plain.message == "run.toml: bad line"
    assert spelled(plain, "'path'") == plain.detail  # no setting: nothing to spell
    again = pickle.loads(pickle.dumps(Unsupported("m", setting="seq_len", value=9)))
    assert type(again) is Unsupported and str(again) == "--seq-len 9: m"
    assert again.exit_code == ExitCode.BAD_INPUT


def test_every_kind_in_errors_py_has_its_code():
    kinds = {c for c in vars(errors).values()
             if isinstance(c, type) and issubclass(c, EdgeTuneError)}
    assert kinds == set(EXIT_CODES)
    assert {k: k("x").exit_code for k in kinds} == EXIT_CODES
    assert issubclass(errors.RecordError, DataError)
    assert issubclass(errors.ContextOverflow, UsageError)
