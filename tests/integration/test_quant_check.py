"""Every way a merged or quantized model leaves edge-tune is checked before it takes its name:
`export --merge -q TYPE`, `-q auto`, the TUI's merged export and `bundle --merged`. A model
that fails is never left at the output name (it is kept as NAME.rejected.gguf with the reason,
or, in a bundle, not written), and the message names the cause with measured numbers.

The degraded merge is built deterministically, the way it happens with real models: the base
is already quantized (the tiny llama's weights on llama.cpp's Q4_0 grid, stored as F32) and
the adapter's weight changes are small (RMS 8e-4 per matrix, about a tenth of half a Q5_0
step). Q4_K_M (which falls back to Q5_0 on these 64-wide rows, a grid the base is already on)
rounds them back to the base; Q8_0 and its F32 merge keep them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.helpers.cli import run_cli_in_process as cli
from tests.helpers.quant_grid import DELTA_RMS, _error_line, _grid_base

@pytest.fixture(scope="module", autouse=True)
def _one_llama_thread():
    from tests.helpers.serve_helpers import one_llama_thread

    with one_llama_thread():  # verify's llama.cpp side: threads stall each other under load
        yield


def _small_deltas(peft_dir: Path) -> None:
    """Replace the trained LoRA weights with seeded ones whose merged change has RMS
    DELTA_RMS in every matrix (training's own are about that size after one step, but
    depend on the CPU's bf16 arithmetic)."""
    from safetensors.numpy import load_file, save_file

    config = json.loads((peft_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    weights = load_file(str(peft_dir / "adapter_model.safetensors"))
    rng = np.random.default_rng(0)
    for key in sorted(weights):
        if ".lora_A." not in key:
            continue
        a_shape, b_key = weights[key].shape, key.replace(".lora_A.", ".lora_B.")
        a = rng.uniform(-1, 1, a_shape) / np.sqrt(a_shape[1])
        b = rng.normal(size=weights[b_key].shape)
        b *= DELTA_RMS / np.sqrt(np.mean((scale * b @ a) ** 2))
        weights[key], weights[b_key] = a.astype(np.float32), b.astype(np.float32)
    save_file(weights, str(peft_dir / "adapter_model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def small_delta_run(tiny, tiny_hf, demo_jsonl, tmp_path_factory) -> Path:
    """A finished run (1 step, its PEFT weights then replaced, see :func:`_small_deltas`) on
    the Q4_0-grid base."""
    root = tmp_path_factory.mktemp("quant-check")
    base = _grid_base(tiny, tiny_hf, root / "tiny-q4grid.gguf")
    data = root / "data.jsonl"
    data.write_text("".join(demo_jsonl.read_text().splitlines(keepends=True)[:8]))
    run = root / "runs" / "small"
    proc = cli("train", "--model", str(base), "--data", str(data), "--backend", "cpu",
               "--max-steps", "1", "--batch-size", "4", "--seq-len", "64", "--report-to",
               "none", "--no-verify", "--out", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _small_deltas(run / "adapter")
    return run


def test_failed_quantized_merge_leaves_no_file_and_names_the_cause(small_delta_run):
    """-q Q4_K_M: the file fails, nothing is at RUN/merged-q4_k_m.gguf (a file an earlier
    export left there goes too); it is kept as .rejected.gguf with the reason, which says
    quantization loss (the F32 merge is exact) and that Q8_0, measured, passes."""
    run = small_delta_run
    out = run / "merged-q4_k_m.gguf"
    out.write_bytes(b"an earlier export")
    line = _error_line(cli("export", str(run), "--merge", "-q", "Q4_K_M"))
    assert not out.exists()
    assert "quantization loss: Q4_K_M rounded away" in line and "F32 merge matches" in line
    assert "Q8_0 passes" in line and "--quant Q8_0" in line
    assert "not a merge of this run" not in line
    fe = float(line.split("file effect ")[1].split("%")[0])
    assert fe < 50, line
    rejected, note = run / "merged-q4_k_m.rejected.gguf", run / "merged-q4_k_m.rejected.txt"
    assert rejected.stat().st_size > 0 and "quantization loss" in note.read_text()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temp folder left
    print(line)


def test_quant_auto_writes_the_smallest_type_that_passes(small_delta_run):
    proc = cli("export", str(small_delta_run), "--merge", "-q", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tries = [line.split("--quant auto: ")[1] for line in proc.stderr.splitlines()
             if "--quant auto: " in line]
    print("\n".join(tries))
    assert tries[0].startswith("Q4_K_M fails")
    assert all(" fails " in t for t in tries[:-1]) and " passes " in tries[-1]
    chosen = tries[-1].split()[0]
    assert chosen in ("Q5_K_M", "Q6_K", "Q8_0")
    assert (small_delta_run / f"merged-{chosen.lower()}.gguf").is_file()
    assert not (small_delta_run / "merged-q4_k_m.gguf").exists()
    assert not (small_delta_run / "merged-auto.gguf").exists()


def test_merged_bundle_refuses_a_degraded_merge(small_delta_run, tmp_path):
    out = tmp_path / "box"
    line = _error_line(cli("bundle", str(small_delta_run), "--merged", "--quant", "Q4_K_M",
                           "-o", str(out)))
    assert "quantization loss" in line and "Q8_0 passes" in line
    assert not out.exists() and not list(tmp_path.iterdir())


def test_tui_merged_export_refuses_a_degraded_merge(small_delta_run):
    pytest.importorskip("textual")
    from tests.helpers.pilot import run, until

    from edge_tune.tui.app import EdgeTuneApp
    from textual.widgets import DataTable, RichLog

    def log_text(log: RichLog) -> str:  # the log wraps long lines: joined back into one text
        return " ".join(" ".join(line.text.split()) for line in log.lines)

    out = small_delta_run / "merged-q4_k_m.gguf"
    app = EdgeTuneApp(runs_root=small_delta_run.parent)

    async def scenario(pilot):
        await pilot.press("f4")
        screen = pilot.app.screen
        await until(pilot, lambda: screen.query_one("#runs", DataTable).row_count == 1, 60)
        actions = screen.query_one("#actions", RichLog)
        await pilot.press("e")
        await until(pilot, lambda: type(pilot.app.screen).__name__ == "ExportChoice", 60)
        labels = [label for label, _ in screen.export_choices()]
        await pilot.press(*["down"] * labels.index("merged GGUF, Q4_K_M"), "enter")
        await until(pilot, lambda: "error:" in log_text(actions) or "done" in
                    log_text(actions), 600, "export")
        text = log_text(actions)
        assert "quantization loss" in text and "Q8_0 passes" in text, text

    run(scenario, app, size=(160, 40))
    assert not out.exists()
    assert (small_delta_run / "merged-q4_k_m.rejected.gguf").is_file()
