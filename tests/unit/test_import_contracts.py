"""Rules as code, enforced by `make test` too: import-linter's contracts (pyproject.toml,
``[tool.importlinter]``: the core imports no front end, no import cycles, the format layer
imports no ML framework nor llama.cpp) and ruff."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers import import_contracts
import pytest
from tests.helpers.cli import REPO

PACKAGE_DIRS = ["edge_tune", "converters", "tui"]


def test_import_contracts_are_kept():
    if import_contracts.lint_imports_command() is None:
        pytest.skip("import-linter is not installed (pip install 'edge-tune[test]')")
    proc = import_contracts.run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # every contract ran (one naming a module missing from the graph, e.g. edge_tune.tui
    # without the installed layout, is an error, not a pass)
    kept = re.search(r"Contracts: (\d+) kept, 0 broken", proc.stdout)
    assert kept and int(kept.group(1)) == proc.stdout.count("KEPT") >= 3, proc.stdout

def test_ruff_finds_nothing():
    probe = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("ruff is not installed (pip install 'edge-tune[test]')")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *PACKAGE_DIRS,
                           "tests", "benchmarks"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
