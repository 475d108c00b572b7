"""The default ``--target-modules`` means every attention and MLP projection of the blocks, by
the model's own names: Llama's seven, Phi-3's fused ``qkv_proj``/``gate_up_proj``,
StarCoder2's ``c_fc``/``c_proj``; never a mixture-of-experts router. Train says which layers it
put LoRA on, and the manifest records those names, not the requested default.

The end-to-end case is the tiny phi3 family (tests/helpers/tiny_families.py) on the cpu backend, one
step, verified by train itself (llama.cpp against torch+PEFT), so the fused layers' export is
exercised too.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.cli import run_cli_in_process as cli
from edge_tune.training.lora_targets import resolve, summary
from edge_tune.config import ALL_LINEAR, DEFAULT_TARGETS

from tests.helpers.tiny_families import family_gguf  # noqa: E402

PHI3 = ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
STARCODER2 = ["c_fc", "c_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
MIXTRAL = ["gate", "k_proj", "o_proj", "q_proj", "v_proj", "w1", "w2", "w3"]


def test_the_default_is_every_projection_by_the_models_names():
    assert resolve(DEFAULT_TARGETS, sorted(DEFAULT_TARGETS)) == DEFAULT_TARGETS
    assert resolve(DEFAULT_TARGETS, PHI3) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert resolve(DEFAULT_TARGETS, STARCODER2) == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                    "c_fc", "c_proj"]
    assert resolve(DEFAULT_TARGETS, MIXTRAL) == ["q_proj", "k_proj", "v_proj", "o_proj", "w1",
                                                 "w2", "w3"]  # not the router
    assert resolve([ALL_LINEAR], MIXTRAL) == MIXTRAL  # PEFT's all-linear: the router too
    assert resolve(["qkv_proj"], PHI3) == ["qkv_proj"]

    from edge_tune.training.backends import unsloth as uq
    from edge_tune.config import TrainConfig

    # every backend gets the resolved names (the worker resolves them before it loads)
    phi3 = resolve(DEFAULT_TARGETS, PHI3)
    assert uq.peft_kwargs(TrainConfig(target_modules=phi3))["target_modules"] == phi3


def test_the_summary_counts_each_layer():
    shapes = {f"model.layers.{i}.{m}.weight": [8, 8] for i in range(2)
              for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.down_proj")}
    shapes["model.layers.0.input_layernorm.weight"] = [8]
    shapes["lm_head.weight"] = [8, 8]
    assert summary(shapes, ["qkv_proj", "down_proj"]) == \
        "LoRA on qkv_proj x2, down_proj x2 (4 layers in 2 blocks)"


@pytest.mark.slow
def test_phi3_default_trains_the_fused_projections_and_the_manifest_says_so(tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in [("Name a fruit.", "An apple."), ("Say hello.", "Hello there!")]))
    run = tmp_path / "run"
    proc = cli("train", "--data", str(data), "--model", str(family_gguf("phi3")),
               "--backend", "cpu", "--max-steps", "1", "--batch-size", "2", "--seq-len", "64",
               "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--out", str(run))
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-3000:]
    assert "LoRA on qkv_proj x2, o_proj x2, gate_up_proj x2, down_proj x2 (8 layers in 2 " \
           "blocks)" in said
    assert "verify: adapter effect error" in said and "(ok)" in said, said[-2000:]
    targeted = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    man = json.loads((run / "manifest.json").read_text())
    assert man["hyperparameters"]["target_modules"] == targeted
    assert "target_modules" not in man["result"]
    peft = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert sorted(peft["target_modules"]) == sorted(targeted)
