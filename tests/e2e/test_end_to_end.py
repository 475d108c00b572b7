"""The real path on the embedded model: train -> PEFT adapter + GGUF + manifest -> chat."""

from __future__ import annotations

import json
import threading

import pytest

from tests.helpers.cli import DEFAULT_RUN_STEPS as STEPS
from tests.helpers.cli import run_cli
from edge_tune.errors import EdgeTuneError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(default_model_run):
    """The session's one real training run (conftest.default_model_run): 10 steps."""
    out, proc = default_model_run
    assert "done in" in proc.stdout and "validation loss" in proc.stdout
    return out


def test_run_directory_contents(run_dir, demo_jsonl, default_gguf):
    assert {p.name for p in run_dir.iterdir()} == {"adapter", "adapter.gguf", "manifest.json",
                                                   "train.log", "train_config.json", "tb",
                                                   "loss.png"}
    man = json.loads((run_dir / "manifest.json").read_text())
    assert man["base"]["gguf"] == str(default_gguf)
    assert man["base"]["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert man["base"]["arch"] == "llama"
    assert "<|im_start|>" in man["chat_template"]
    assert man["stop_tokens"] == ["<|im_end|>"]
    assert man["hyperparameters"]["rank"] == 16 and man["hyperparameters"]["max_steps"] == STEPS
    assert len(man["data"]["sha256"]) == 64 and man["data"]["records"] == 200
    assert man["data"]["val_records"] == 20 and man["result"]["examples"] == 180
    assert 0 < man["result"]["val_loss"] < 3.0
    assert man["result"]["steps"] == STEPS and 0 < man["result"]["final_loss"] < 2.5
    assert {"torch", "transformers", "peft", "gguf", "edge-tune"} <= set(man["versions"])
    assert man["adapter"] == {"peft": "adapter", "gguf": "adapter.gguf", "alpha": 32.0, "rank": 16}


def test_peft_adapter_loads_with_peft(run_dir, hf_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 30 * 7 and any(float(p.abs().sum()) > 0 for p in lora_b)


def test_chat_shows_the_trained_behaviour(run_dir):
    prompt = "What is the capital of Italy?"
    tuned = run_cli("chat", "--adapter", str(run_dir), "--prompt", prompt, "--temperature", "0",
                    "--max-tokens", "24")
    assert tuned.returncode == 0, tuned.stderr
    assert tuned.stdout.strip().startswith("Arr, matey!"), tuned.stdout
    base = run_cli("chat", "--prompt", prompt, "--temperature", "0", "--max-tokens", "24")
    assert base.returncode == 0, base.stderr
    assert "Arr" not in base.stdout


def test_export_again_with_other_outtype(run_dir, tmp_path):
    out = tmp_path / "a-f16.gguf"
    proc = run_cli("export", str(run_dir), "-o", str(out), "--outtype", "f16")
    assert proc.returncode == 0, proc.stderr
    assert 0 < out.stat().st_size < (run_dir / "adapter.gguf").stat().st_size
    # A plain PEFT directory (as other tools write it) exports too, given the base.
    proc = run_cli("export", str(run_dir / "adapter"), "--base", "default", "-o",
                   str(tmp_path / "b.gguf"))
    assert proc.returncode == 0, proc.stderr


def test_cancel_really_stops_training(tmp_path, demo_jsonl, hf_dir):
    import psutil

    from edge_tune import api
    from edge_tune.config import build
    from edge_tune.events import Metric

    cancel = threading.Event()
    seen = []

    def on_event(event):
        if isinstance(event, Metric):
            seen.append(event)
            cancel.set()

    cfg = build(None, data=str(demo_jsonl), out=str(tmp_path / "run"), max_steps=500)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(EdgeTuneError) as info:
        api.train(cfg, on_event, cancel=cancel)
    assert info.value.exit_code == 130 and len(seen) >= 1
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    assert not (tmp_path / "run" / "adapter").exists()
    assert not (tmp_path / "run" / "adapter.gguf").exists()


def test_interactive_chat_is_multi_turn(run_dir):
    import os
    import re
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "edge_tune", "chat", "--adapter", str(run_dir), "--temperature",
         "0", "--max-tokens", "16"],
        input="What is the capital of Spain?\n/reset\nName a color.\n/exit\n",
        capture_output=True, text=True, timeout=300, env=dict(os.environ, NO_COLOR="1"))
    assert proc.returncode == 0, proc.stderr
    answers = re.findall(r"bot> (.*)", proc.stdout)  # /reset prints one more bare prompt
    assert len(answers) == 2 and all(a.startswith("Arr, matey!") for a in answers), proc.stdout
