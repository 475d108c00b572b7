"""The mlx backend for real, on mlx's Linux CPU build, with a tiny local Llama.

Parity: llama.cpp (base + exported adapter - base) against mlx (tuned - base) on the same
tokens, on an F32 base. The tiny model is F32 from the start, so its GGUF is its own F32 copy.
Covers adapters trained by `edge-tune train --backend mlx` and by stock `mlx_lm lora`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from tests.helpers.cli import run_cli

pytest.importorskip("mlx_lm")
pytestmark = pytest.mark.slow

TEXT = ("<|im_start|>user\nWhat do bees make?<|im_end|>\n<|im_start|>assistant\n"
        "Arr, matey! Bees make honey in their hives")


@pytest.fixture(scope="module")
def engine(tiny):
    from edge_tune.llama.engine import Engine

    with Engine(tiny, n_ctx=256, logits_all=True, exact=True) as eng:
        yield eng


@pytest.fixture(scope="module")
def mlx_run(tiny, demo_jsonl, tmp_path_factory):
    """`edge-tune train --backend mlx` on the tiny model: pirate answers, high lr."""
    out = tmp_path_factory.mktemp("mlxrun") / "run"
    proc = run_cli("train", "--backend", "mlx", "--model", str(tiny), "--data",
                   str(demo_jsonl), "--max-steps", "24", "--batch-size", "2", "--lr", "1e-2",
                   "--seq-len", "96", "--val-split", "0.05", "--out", str(out))
    # train verified the run (mlx against llama.cpp) by default: it exits non-zero otherwise
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out


def _mlx_logits(hf_dir, tokens, adapter=None):
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(hf_dir), adapter_path=str(adapter) if adapter else None)
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def _llama_delta(engine, adapter_path, tokens):
    engine.activate(None)
    base = engine.logits(tokens)
    engine.activate(engine.add_adapter(adapter_path, str(adapter_path)))
    tuned = engine.logits(tokens)
    engine.activate(None)
    return tuned - base


def _rel_err(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_mlx_run_has_every_artifact(mlx_run):
    man = json.loads((mlx_run / "manifest.json").read_text())
    assert man["backend"] == "mlx"
    assert man["adapter"]["mlx"] == "mlx" and man["adapter"]["gguf"] == "adapter.gguf"
    for name in ("mlx/adapters.safetensors", "mlx/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                 "adapter.gguf"):
        assert (mlx_run / name).is_file(), name
    native = json.loads((mlx_run / "mlx/adapter_config.json").read_text())
    assert native["lora_parameters"]["scale"] == pytest.approx(32 / 16)  # alpha / rank
    peft = json.loads((mlx_run / "adapter/adapter_config.json").read_text())
    assert (peft["r"], peft["lora_alpha"]) == (16, 32)
    assert man["result"]["val_loss"] is not None
    assert man["result"]["final_loss"] < 10.0  # from ~12 at the start


def test_mlx_trained_adapter_matches_llama_cpp(mlx_run, tiny_hf, engine):
    tokens = engine.tokenize(TEXT)
    want = _mlx_logits(tiny_hf, tokens, mlx_run / "mlx") - _mlx_logits(tiny_hf, tokens)
    assert np.linalg.norm(want) > 1.0  # training really moved the logits
    err = _rel_err(_llama_delta(engine, mlx_run / "adapter.gguf", tokens), want)
    print(f"mlx backend -> GGUF relative error: {err:.2e}")
    assert err <= 0.02


def test_stock_mlx_lm_lora_adapter_exports_with_parity(tiny_hf, tiny, engine, demo_jsonl,
                                                       tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = demo_jsonl.read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(rows[:16]) + "\n")
    (data / "valid.jsonl").write_text("\n".join(rows[16:20]) + "\n")
    adapter = tmp_path / "stock-adapter"
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "lora", "--model", str(tiny_hf), "--train",
         "--data", str(data), "--iters", "4", "--batch-size", "2", "--num-layers", "-1",
         "--learning-rate", "2e-2", "--adapter-path", str(adapter), "--val-batches", "1",
         "--steps-per-eval", "100", "--max-seq-length", "96"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "stock.gguf"
    proc = run_cli("export", str(adapter), "--base", str(tiny), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    tokens = engine.tokenize(TEXT)
    want = _mlx_logits(tiny_hf, tokens, adapter) - _mlx_logits(tiny_hf, tokens)
    assert np.linalg.norm(want) > 0.1
    err = _rel_err(_llama_delta(engine, out, tokens), want)
    print(f"stock mlx_lm lora -> GGUF relative error: {err:.2e}")
    assert err <= 0.02


def test_chat_with_the_mlx_run_shows_the_trained_behaviour(mlx_run):
    base = run_cli("chat", "--prompt", "What do bees make?",
                   "--temperature", "0", "--max-tokens", "8", "--base",
                   str(json.loads((mlx_run / "manifest.json").read_text())["base"]["gguf"]))
    tuned = run_cli("chat", "--adapter", str(mlx_run), "--prompt", "What do bees make?",
                    "--temperature", "0", "--max-tokens", "8")
    assert base.returncode == 0 and tuned.returncode == 0, base.stderr + tuned.stderr
    assert tuned.stdout.strip().startswith("Arr"), tuned.stdout
    assert not base.stdout.strip().startswith("Arr"), base.stdout


def test_verify_checks_an_mlx_run_against_mlx_itself(mlx_run):
    proc = run_cli("verify", str(mlx_run), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["framework"] == "mlx"
    assert report["effect_rel_err"] <= 0.02
