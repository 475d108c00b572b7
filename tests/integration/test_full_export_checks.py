"""A full fine-tuning run's quantized export is checked like a merge (tests/integration/test_quant_check.py):
one that fails the check is never left at the output name (it is kept as
NAME.rejected.gguf with the reason), and `export RUN -q auto` writes the smallest type whose
check passes.

The degraded model is built the same deterministic way as the merge there: the base is the
tiny llama on llama.cpp's Q4_0 grid (stored as F32), and the run's weights are that base plus
changes of RMS 8e-4 in each projection matrix. Q4_K_M (Q5_0 on these 64-wide rows, a grid the
base is already on) rounds them back to the base; Q8_0 keeps them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tests.helpers.cli import run_cli_in_process as cli
from tests.helpers.quant_grid import DELTA_RMS, _error_line, _grid_base

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", autouse=True)
def _one_llama_thread():
    from tests.helpers.serve_helpers import one_llama_thread

    with one_llama_thread():  # verify's llama.cpp side: threads stall each other under load
        yield


def _small_changes(model_dir: Path, base_hf: Path) -> None:
    """The run's weights (``RUN/model``) set to the base's plus seeded changes of RMS
    DELTA_RMS in every projection matrix; every other tensor is the base's own (one step of
    training moves every weight by about the learning rate, an amount that depends on the
    CPU's bf16 arithmetic)."""
    from safetensors.numpy import load_file, save_file

    path = next(model_dir.glob("*.safetensors"))
    weights, base = load_file(str(path)), load_file(str(base_hf / "model.safetensors"))
    rng = np.random.default_rng(0)
    for key in sorted(weights):
        value = base.get(key, base.get("model.embed_tokens.weight") if key == "lm_head.weight"
                         else None)
        assert value is not None and value.shape == weights[key].shape, key
        if any(f".{p}." in key for p in PROJECTIONS):
            value = value + rng.normal(scale=DELTA_RMS, size=value.shape)
        weights[key] = value.astype(weights[key].dtype)
    save_file(weights, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def small_change_full_run(tiny, tiny_hf, demo_jsonl, tmp_path_factory) -> Path:
    """A finished full fine-tuning run (1 step, its weights then replaced, see
    :func:`_small_changes`) on the Q4_0-grid base."""
    from edge_tune import models

    root = tmp_path_factory.mktemp("full-quant-check")
    base = _grid_base(tiny, tiny_hf, root / "tiny-q4grid.gguf")
    data = root / "data.jsonl"
    data.write_text("".join(demo_jsonl.read_text().splitlines(keepends=True)[:8]))
    run = root / "runs" / "full"
    proc = cli("train", "--full", "--model", str(base), "--data", str(data), "--backend", "cpu",
               "--max-steps", "1", "--batch-size", "4", "--seq-len", "64", "--report-to",
               "none", "--no-verify", "--out", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _small_changes(run / "model", models.dequantized_copy(base))
    return run


def test_failed_quantized_full_export_leaves_no_file_at_its_name(small_change_full_run):
    """-q Q4_K_M of the full run: the file fails; nothing is at RUN/model-q4_k_m.gguf (a file
    an earlier export left there goes too); it is kept as .rejected.gguf with the reason,
    which says quantization loss and that Q8_0, measured, passes."""
    run = small_change_full_run
    out = run / "model-q4_k_m.gguf"
    out.write_bytes(b"an earlier export")
    line = _error_line(cli("export", str(run), "-q", "Q4_K_M"))
    assert not out.exists()
    assert "quantization loss: Q4_K_M rounded away" in line, line
    assert "Q8_0 passes" in line and "--quant Q8_0" in line, line
    rejected, note = run / "model-q4_k_m.rejected.gguf", run / "model-q4_k_m.rejected.txt"
    assert rejected.stat().st_size > 0 and "quantization loss" in note.read_text()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_quant_auto_writes_the_smallest_type_that_passes_for_a_full_run(small_change_full_run):
    run = small_change_full_run
    proc = cli("export", str(run), "-q", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tries = [line.split("--quant auto: ")[1] for line in proc.stderr.splitlines()
             if "--quant auto: " in line]
    assert tries and tries[0].startswith("Q4_K_M fails"), tries
    assert all(" fails " in t for t in tries[:-1]) and " passes " in tries[-1], tries
    chosen = tries[-1].split()[0]
    assert chosen in ("Q5_K_M", "Q6_K", "Q8_0"), tries
    assert (run / f"model-{chosen.lower()}.gguf").is_file()
    assert not (run / "model-q4_k_m.gguf").exists() and not (run / "model-auto.gguf").exists()
