"""What the tests share besides fixtures: the repository root, the CLI run as a user runs it
(a subprocess) or in this process, the one-line error check, and the session's default-model
training arguments."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: The one real training run of the default model that the session shares (see
#: ``default_model_run``): few steps of the bundled pirate data already make every answer
#: start "Arr, matey!". Packed rows of 256 tokens hold every demo chat whole (the longest is
#: 130 tokens) with less padding than the default 512.
DEFAULT_RUN_STEPS = 10
DEFAULT_RUN_ARGS = ("--max-steps", str(DEFAULT_RUN_STEPS), "--seq-len", "256", "--seed", "0",
                    "--val-split", "0.1")


def assert_one_line_error(proc, *needles) -> None:
    """Exit code 2, exactly one stderr line ``error: ...`` holding every needle, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1, proc.stderr  # exactly one line: no blank lines, no warnings
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 1800,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``edge-tune ARGS`` in a subprocess, as a user would (``env``: extra variables)."""
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "edge_tune", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env=env)


def run_cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """``edge-tune ARGS`` in this process, through ``edge_tune.cli.main`` (exit code, stdout,
    stderr), printed as ``run_cli`` has it printed (200 columns, no colour)."""
    from edge_tune import cli as cli_module

    stdout, stderr = io.StringIO(), io.StringIO()
    consoles = (cli_module.out, cli_module.err)
    saved = sys.argv, [(c.width, c.no_color) for c in consoles]
    sys.argv = ["edge-tune", *args]
    for c in consoles:
        c.width, c.no_color = 200, True
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            cli_module.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.argv = saved[0]
        for c, (width, no_color) in zip(consoles, saved[1]):
            c.width, c.no_color = width, no_color
    return subprocess.CompletedProcess(["edge-tune", *args], code, stdout.getvalue(),
                                       stderr.getvalue())
