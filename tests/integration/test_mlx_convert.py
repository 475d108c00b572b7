"""mlx-lm adapter -> PEFT mapping (pure) and the export command on mlx adapter directories."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.helpers.cli import assert_one_line_error, run_cli

from edge_tune.converters.formats.mlx_to_peft import is_mlx_adapter_dir, to_peft
from edge_tune.errors import EdgeTuneError

RANK, IN, OUT = 4, 12, 10


def _adapter(layers=(0, 1), modules=("self_attn.q_proj", "mlp.down_proj"), seed=0):
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in layers:
        for m in modules:
            tensors[f"model.layers.{layer}.{m}.lora_a"] = rng.standard_normal((IN, RANK))
            tensors[f"model.layers.{layer}.{m}.lora_b"] = rng.standard_normal((RANK, OUT))
    config = {"fine_tune_type": "lora", "num_layers": len(layers),
              "lora_parameters": {"rank": RANK, "scale": 20.0, "dropout": 0.0}}
    return config, tensors


def test_to_peft_computes_the_same_update_as_mlx():
    config, tensors = _adapter()
    peft_cfg, peft = to_peft(config, tensors)
    assert peft_cfg["r"] == RANK and peft_cfg["lora_alpha"] == pytest.approx(20.0 * RANK)
    assert peft_cfg["target_modules"] == ["down_proj", "q_proj"]
    assert peft_cfg["layers_to_transform"] == [0, 1]
    x = np.random.default_rng(1).standard_normal((3, IN))
    a = tensors["model.layers.1.self_attn.q_proj.lora_a"]
    b = tensors["model.layers.1.self_attn.q_proj.lora_b"]
    mlx_update = 20.0 * (x @ a) @ b  # mlx-lm: scale * (x @ lora_a) @ lora_b
    key = "base_model.model.model.layers.1.self_attn.q_proj."
    big_a, big_b = peft[key + "lora_A.weight"], peft[key + "lora_B.weight"]
    assert big_a.shape == (RANK, IN) and big_b.shape == (OUT, RANK)
    peft_update = (peft_cfg["lora_alpha"] / peft_cfg["r"]) * (big_b @ (big_a @ x.T)).T
    np.testing.assert_allclose(peft_update, mlx_update, rtol=1e-5)


def test_only_the_adapted_layers_are_listed():
    # mlx-lm's num_layers counts from the last block: an adapter on blocks 28, 29 only.
    peft_cfg, _ = to_peft(*_adapter(layers=(28, 29)))
    assert peft_cfg["layers_to_transform"] == [28, 29]


def test_dora_magnitudes_map_to_peft_and_mark_the_adapter():
    config, tensors = _adapter(layers=(0,), modules=("self_attn.q_proj",))
    config["fine_tune_type"] = "dora"
    tensors["model.layers.0.self_attn.q_proj.m"] = np.ones(OUT)
    peft_cfg, peft = to_peft(config, tensors)
    assert peft_cfg["use_dora"] is True
    assert peft["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"].shape \
        == (OUT,)


@pytest.mark.parametrize("mutate, needle", [
    (lambda c, t: c["lora_parameters"].pop("scale"), "lora_parameters.scale"),
    (lambda c, t: c.update(fine_tune_type="full"), "'full' is not a LoRA adapter"),
    (lambda c, t: t.pop("model.layers.0.mlp.down_proj.lora_b"), "has lora_a but no lora_b"),
    (lambda c, t: t.update({"model.layers.0.mlp.down_proj.weight": np.zeros((2, 2))}),
     "is not an mlx-lm LoRA weight"),
    (lambda c, t: c["lora_parameters"].update(rank=8), "tensors have rank 4"),
    (lambda c, t: t.update({"model.layers.0.mlp.up_proj.lora_a": np.zeros((IN, 2)),
                            "model.layers.0.mlp.up_proj.lora_b": np.zeros((2, OUT))}),
     "ranks differ"),
])
def test_bad_adapters_are_refused_with_the_reason(mutate, needle):
    config, tensors = _adapter()
    mutate(config, tensors)
    with pytest.raises(EdgeTuneError, match=needle.replace("(", r"\(")):
        to_peft(config, tensors, where="adapters")


def _write_mlx_dir(path, config, tensors):
    from safetensors.numpy import save_file

    path.mkdir()
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()},
              str(path / "adapters.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_mlx_dirs_are_told_apart_from_peft_dirs(tmp_path):
    mlx_dir = _write_mlx_dir(tmp_path / "mlx", *_adapter())
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    assert is_mlx_adapter_dir(mlx_dir) and not is_mlx_adapter_dir(peft_dir)


def test_export_of_an_mlx_dora_adapter_points_to_the_merged_export(tmp_path, default_gguf):
    config, tensors = _adapter(layers=(0,), modules=("self_attn.q_proj",))
    config["fine_tune_type"] = "dora"
    tensors["model.layers.0.self_attn.q_proj.m"] = np.ones(OUT)
    mlx_dir = _write_mlx_dir(tmp_path / "dora", config, tensors)
    proc = run_cli("export", str(mlx_dir), "--base", str(default_gguf), "--no-verify")
    assert_one_line_error(proc, "DoRA", "merge")
    assert not (tmp_path / "dora.gguf").exists()


def test_export_of_an_mlx_adapter_for_another_shape_fails_cleanly(tmp_path, default_gguf):
    mlx_dir = _write_mlx_dir(tmp_path / "wrong", *_adapter())  # 12 -> 10, not SmolLM2's 576
    proc = run_cli("export", str(mlx_dir), "--base", str(default_gguf), "--no-verify")
    assert_one_line_error(proc)
    assert not (tmp_path / "wrong.gguf").exists()
