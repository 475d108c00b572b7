"""`edge-tune export RUN --vllm DIR`: a PEFT directory vLLM loads, and its `vllm serve` line.

vLLM itself is not installable here (no GPU); what it reads is checked instead: the config keys
of its PEFTHelper, PEFT loading the exported directory on the run's base, and the command.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from tests.helpers.cli import assert_one_line_error, run_cli
from tests.helpers.tiny_models import tiny_llama_gguf


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, default_gguf, demo_jsonl) -> Path:
    root = tmp_path_factory.mktemp("vllm")
    model = tiny_llama_gguf(root / "tiny.gguf", default_gguf)
    run = root / "run"
    proc = run_cli("train", "--data", str(demo_jsonl), "--model", str(model), "--max-steps", "2",
                   "--batch-size", "2", "--rank", "4", "--alpha", "8", "--seq-len", "128",
                   "--no-verify", "--out", str(run), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def test_max_lora_rank_is_the_smallest_allowed_value():
    from edge_tune.converters.integrations.vllm_export import max_lora_rank

    from edge_tune.errors import EdgeTuneError

    assert [max_lora_rank(r) for r in (1, 8, 9, 16, 33, 300, 320, 321, 512)] == \
        [8, 8, 16, 16, 64, 320, 320, 512, 512]
    with pytest.raises(EdgeTuneError, match="513"):
        max_lora_rank(513)


def test_vllm_config_refuses_what_vllm_cannot_serve():
    from edge_tune.converters.integrations.vllm_export import vllm_config

    from edge_tune.errors import EdgeTuneError

    ok = vllm_config({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}, "org/base")
    assert ok["use_rslora"] is False and ok["base_model_name_or_path"] == "org/base"
    with pytest.raises(EdgeTuneError, match="DoRA"):
        vllm_config({"r": 8, "target_modules": ["q_proj"], "use_dora": True}, "b")
    with pytest.raises(EdgeTuneError, match="target_modules"):
        vllm_config({"r": 8}, "b")


def test_export_vllm_writes_a_loadable_peft_dir_and_the_serve_command(tiny_run, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "vllm"
    proc = run_cli("export", str(tiny_run), "--vllm", str(out))
    assert proc.returncode == 0, proc.stderr
    man = json.loads((tiny_run / "manifest.json").read_text())
    base = man["base"]["hf_dir"]
    adapter = (out / tiny_run.name).resolve()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "target_modules", "base_model_name_or_path", "use_rslora"):
        assert key in cfg, key
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (4, 8, False)
    assert sorted(cfg["target_modules"]) == sorted(man["hyperparameters"]["target_modules"])
    assert cfg["base_model_name_or_path"] == base

    expected = ["vllm", "serve", base, "--enable-lora", "--lora-modules",
                f"{tiny_run.name}={adapter}", "--max-lora-rank", "8"]
    assert shlex.split(proc.stdout.strip()) == expected
    script = (out / "serve.sh").read_text()
    assert script.startswith("#!/bin/sh") and shlex.join(expected) in script
    assert (out / "serve.sh").stat().st_mode & 0o111

    # PEFT loads it on the run's base (the path the config names), with the trained weights.
    model = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
    tuned = PeftModel.from_pretrained(model, str(adapter))
    trained = load_file(str(tiny_run / "adapter" / "adapter_model.safetensors"))
    loaded = {k: v for k, v in tuned.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(trained) > 0
    for name, tensor in trained.items():
        match = [v for k, v in loaded.items() if k.startswith(name.removesuffix(".weight"))]
        assert len(match) == 1 and torch.equal(match[0], tensor), name


def test_export_vllm_refuses_a_gguf_base(tiny_run, tmp_path):
    proc = run_cli("export", str(tiny_run), "--vllm", str(tmp_path / "v"),
                   "--base", str(tiny_run.parent / "tiny.gguf"))
    assert_one_line_error(proc, "--base", "HF")
    assert not (tmp_path / "v" / "serve.sh").exists()
