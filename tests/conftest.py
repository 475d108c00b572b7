"""Shared fixtures: the real embedded model, its dequantized HF copy, an F32 copy of its GGUF.

Everything is built locally from the embedded default model (no hub access). Session-scoped:
the dequantized copy is cached in the user cache, so only the first run pays ~1 minute.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# torch and llama.cpp share out their work with OpenMP (libgomp). By default a thread that
# reaches a barrier first spins for its partner; when anything else runs on the machine (the
# other engineers' tests, a CPU hog) the partner is often descheduled, and the spinning takes
# the very core it needs: training steps and token generation then slow down many times over.
# PASSIVE makes waiting threads sleep. Set before any test loads torch or llama.cpp; every
# subprocess the tests start inherits it. An explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from edge_tune import models

    return models.default_gguf()


@pytest.fixture(scope="session")
def tiny(default_gguf, tmp_path_factory) -> Path:
    """A tiny random llama GGUF (hidden 64, 2 blocks, tests/tiny_models.py) with the default
    model's tokenizer, shared by every test that only reads it."""
    from tiny_models import tiny_llama_gguf

    return tiny_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", default_gguf)


@pytest.fixture(scope="session")
def tiny_hf(tiny) -> Path:
    """The tiny model's dequantized HF copy (cached by edge_tune.models)."""
    from edge_tune import models

    return models.dequantized_copy(tiny)


@pytest.fixture(scope="session")
def hf_dir(default_gguf) -> Path:
    from edge_tune import models

    return models.dequantized_copy(default_gguf)


@pytest.fixture(scope="session")
def f32_base(default_gguf, tmp_path_factory) -> Path:
    from edge_tune.converters.formats.gguf_f32 import write_f32_copy

    return write_f32_copy(default_gguf, tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf")


@pytest.fixture(scope="session")
def demo_jsonl() -> Path:
    from edge_tune.demo import demo_data

    return demo_data()


#: The one real training run of the default model that the session shares (see
#: ``default_model_run``): few steps of the bundled pirate data already make every answer
#: start "Arr, matey!". Packed rows of 256 tokens hold every demo chat whole (the longest is
#: 130 tokens) with less padding than the default 512.
DEFAULT_RUN_STEPS = 10
DEFAULT_RUN_ARGS = ("--max-steps", str(DEFAULT_RUN_STEPS), "--seq-len", "256", "--seed", "0",
                    "--val-split", "0.1")


@pytest.fixture(scope="session")
def default_model_run(tmp_path_factory, demo_jsonl,
                      hf_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """(run directory, the finished process) of ``edge-tune train`` on the real default model
    and the bundled demo data, as a user runs it (a subprocess, train's own verify included).
    Trained once per session; tests that change the run copy it first."""
    out = tmp_path_factory.mktemp("default-run") / "pirate"
    proc = run_cli("train", "--data", str(demo_jsonl), "--out", str(out), *DEFAULT_RUN_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


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
