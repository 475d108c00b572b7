"""Shared fixtures: the real embedded model, its dequantized HF copy, an F32 copy of its GGUF.

Everything is built locally from the embedded default model (no hub access). Session-scoped:
the dequantized copy is cached in the user cache, so only the first run pays ~1 minute.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from edge_tune import models

    return models.default_gguf()


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
