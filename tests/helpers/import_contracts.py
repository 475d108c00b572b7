"""Run ``lint-imports`` (import-linter) on edge-tune as it is installed.

``tui/`` and ``converters/`` sit at the top of the repository but install as
``edge_tune.tui`` and ``edge_tune.converters`` (pyproject ``package-dir``). import-linter's
graph builder (grimp) reads one directory per root package, so it is given a view of the
installed layout: a temporary ``edge_tune/`` of symbolic links to the package's own files plus
``converters`` and ``tui``. grimp follows the links and names every module as users import it.
The contracts themselves are in ``pyproject.toml`` (``[tool.importlinter]``).

Usage: ``python tests/helpers/import_contracts.py [lint-imports options]`` (exit code: lint-imports').
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MOUNTED = {"converters": REPO / "converters", "tui": REPO / "tui"}  # name in edge_tune -> dir


def lint_imports_command() -> list[str] | None:
    """``lint-imports`` next to this interpreter (the venv's), else on PATH; None if absent."""
    here = Path(sys.executable).parent / "lint-imports"
    found = str(here) if here.is_file() else shutil.which("lint-imports")
    return [found] if found else None


def run(*args: str) -> subprocess.CompletedProcess:
    """``lint-imports REPO/pyproject.toml ARGS`` over the installed layout; the
    output is captured (stdout holds the contracts' report)."""
    command = lint_imports_command()
    if command is None:
        raise FileNotFoundError("lint-imports is not installed: pip install import-linter")
    with tempfile.TemporaryDirectory(prefix="edge-tune-imports-") as tmp:
        view = Path(tmp) / "edge_tune"
        view.mkdir()
        for entry in (REPO / "edge_tune").iterdir():
            if entry.name != "__pycache__":
                (view / entry.name).symlink_to(entry)
        for name, target in MOUNTED.items():
            (view / name).symlink_to(target)
        # lint-imports puts its working directory first on sys.path: there, `edge_tune`
        # is the view, not the repository's own directory.
        return subprocess.run([*command, str(REPO / "pyproject.toml"), "--no-cache", *args], cwd=tmp, capture_output=True, text=True)


if __name__ == "__main__":
    proc = run(*sys.argv[1:])
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    raise SystemExit(proc.returncode)
