"""Shared fixtures: the real embedded model, its dequantized HF copy, an F32 copy of its GGUF.

Everything is built locally from the embedded default model (no hub access). Session-scoped:
the dequantized copy is cached in the user cache, so only the first run pays ~1 minute.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers.cli import DEFAULT_RUN_ARGS, run_cli

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
    """A tiny random llama GGUF (hidden 64, 2 blocks, tests/helpers/tiny_models.py) with the default
    model's tokenizer, shared by every test that only reads it."""
    from tests.helpers.tiny_models import tiny_llama_gguf

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
