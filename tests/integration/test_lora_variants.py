"""LoRA variants (--rslora, --dora, --lora-dropout, --target-modules) on every backend.

Each run trains a tiny random Llama (hidden 64, 2 blocks, the default model's tokenizer) for a
few steps through ``edge_tune.cli.main`` in this process, and ``train`` verifies it by default
(llama.cpp against torch+PEFT, or against mlx for an mlx run, within verify's tolerance): a
run that exits 0 has been checked. DoRA has no GGUF LoRA form: the GGUF route is refused with
``--merge`` named, and the merged GGUF verifies. The unsloth backend needs a GPU: its argument
mapping is checked here, and its Trainer loop runs a DoRA + rsLoRA PEFT model on the CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tests.helpers.cli import assert_one_line_error
from tests.helpers.cli import run_cli_in_process as cli

TRAIN = ("--max-steps", "2", "--batch-size", "4", "--seq-len", "64", "--lr", "1e-2",
         "--report-to", "none")


def _verified(proc) -> str:
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-3000:]
    assert "verify: adapter effect error" in said and "(ok)" in said, said[-2000:]
    return said


@pytest.fixture(scope="module")
def data(demo_jsonl, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(demo_jsonl.read_text().splitlines(keepends=True)[:8]))
    return path


def _gguf_alpha(path: Path) -> float:
    from edge_tune.converters.formats.base_info import field_value, open_gguf

    return float(field_value(open_gguf(path), "adapter.lora.alpha"))


def _peft_config(run: Path) -> dict:
    return json.loads((run / "adapter" / "adapter_config.json").read_text())


# --- cpu (torch + PEFT) -----------------------------------------------------------------------


def test_cpu_rslora_dropout_all_linear(tiny, data, tmp_path):
    run = tmp_path / "run"
    _verified(cli("train", "--backend", "cpu", "--model", str(tiny), "--data", str(data),
                  *TRAIN, "--rslora", "--lora-dropout", "0.1", "--target-modules", "all-linear",
                  "--rank", "16", "--alpha", "32", "--out", str(run)))
    peft = _peft_config(run)
    assert peft["use_rslora"] is True and peft["use_dora"] is False
    assert peft["lora_dropout"] == pytest.approx(0.1)
    assert set(peft["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                           "up_proj", "down_proj"}
    # llama.cpp scales by alpha/r: rsLoRA's alpha/sqrt(r) is folded in as alpha*sqrt(r)
    assert _gguf_alpha(run / "adapter.gguf") == pytest.approx(32 * math.sqrt(16))


def test_cpu_dora_exports_merged_only(tiny, data, tmp_path):
    run = tmp_path / "run"
    said = _verified_train_dora(cli("train", "--backend", "cpu", "--model", str(tiny),
                                    "--data", str(data), *TRAIN, "--dora", "--target-modules",
                                    "q_proj,v_proj,down_proj", "--out", str(run)))
    assert "--merge" in said and not (run / "adapter.gguf").exists()
    peft = _peft_config(run)
    assert peft["use_dora"] is True and set(peft["target_modules"]) == {"q_proj", "v_proj",
                                                                        "down_proj"}
    refused = cli("export", str(run))
    assert_one_line_error(refused, "DoRA", "--merge")
    _verified(cli("export", str(run), "--merge", "--quant", "F32"))


def _verified_train_dora(proc) -> str:
    """A DoRA run: trained, no GGUF adapter to verify, and the --merge route named."""
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-3000:]
    assert "--dora: a DoRA adapter has no GGUF LoRA form" in said and "--merge" in said, \
        said[-2000:]
    return said


# --- mlx (mlx-lm on mlx's CPU build) ----------------------------------------------------------


def test_mlx_rslora_dropout_targets(tiny, data, tmp_path):
    pytest.importorskip("mlx_lm")
    run = tmp_path / "run"
    _verified(cli("train", "--backend", "mlx", "--model", str(tiny), "--data", str(data),
                  *TRAIN, "--rslora", "--lora-dropout", "0.1", "--target-modules",
                  "q_proj,v_proj,down_proj", "--rank", "16", "--alpha", "32", "--out", str(run)))
    native = json.loads((run / "mlx" / "adapter_config.json").read_text())
    params = native["lora_parameters"]
    assert native["fine_tune_type"] == "lora"
    assert params["scale"] == pytest.approx(32 / math.sqrt(16))  # rsLoRA, exact as the scale
    assert params["dropout"] == pytest.approx(0.1)
    assert params["keys"] == ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
    peft = _peft_config(run)
    assert peft["use_rslora"] is True and peft["lora_alpha"] == pytest.approx(32)
    assert _gguf_alpha(run / "adapter.gguf") == pytest.approx(32 * math.sqrt(16))


def test_mlx_dora_exports_merged_only(tiny, data, tmp_path):
    pytest.importorskip("mlx_lm")
    run = tmp_path / "run"
    _verified_train_dora(cli("train", "--backend", "mlx", "--model", str(tiny), "--data",
                             str(data), *TRAIN, "--dora", "--target-modules", "q_proj,v_proj",
                             "--out", str(run)))
    assert json.loads((run / "mlx" / "adapter_config.json").read_text())[
        "fine_tune_type"] == "dora"
    assert _peft_config(run)["use_dora"] is True and not (run / "adapter.gguf").exists()
    assert_one_line_error(cli("export", str(run)), "DoRA", "--merge")
    _verified(cli("export", str(run), "--merge", "--quant", "F32"))


# --- bad values: one line, exit 2, no run folder ----------------------------------------------


@pytest.mark.parametrize("flags, needles", [
    (("--lora-dropout", "1.0"), ("lora_dropout", "0 to below 1")),
    (("--lora-dropout", "-0.1"), ("lora_dropout",)),
    (("--target-modules", "all-linear,q_proj"), ("target_modules", "all-linear")),
    (("--report-to", "comet"), ("report_to", "tensorboard")),
])
def test_bad_values_before_anything_runs(flags, needles, data, tmp_path):
    proc = cli("train", "--data", str(data), "--out", str(tmp_path / "run"), *flags)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "run").exists()


def test_unknown_module_lists_the_models_linear_layers(tiny, data, tmp_path):
    proc = cli("train", "--backend", "cpu", "--model", str(tiny), "--data", str(data), *TRAIN,
               "--target-modules", "q_proj,qkv_proj", "--out", str(tmp_path / "run"))
    # checked in the training process before the model loads: progress up to it, then one line
    assert "Traceback" not in proc.stderr and proc.stderr.count("error: ") == 1
    assert "loading base model" not in proc.stderr
    proc.stderr = proc.stderr.splitlines()[-1]
    assert_one_line_error(proc, "--target-modules: qkv_proj: no such linear module",
                          "q_proj, up_proj, v_proj", "all-linear")
    assert not (tmp_path / "run").exists()


def test_wandb_not_installed_names_the_install(data, tmp_path):
    from edge_tune.hardware import missing_modules

    if not missing_modules("wandb"):
        pytest.skip("wandb is installed here")
    proc = cli("train", "--data", str(data), "--report-to", "wandb", "--out",
               str(tmp_path / "run"))
    assert_one_line_error(proc, "pip install wandb")


# --- pure parts -------------------------------------------------------------------------------


def test_target_resolution():
    from edge_tune.training.lora_targets import linear_names, resolve
    from edge_tune.config import DEFAULT_TARGETS
    from edge_tune.errors import UsageError

    shapes = {"model.layers.0.self_attn.qkv_proj.weight": [96, 32],
              "model.layers.0.mlp.gate_up_proj.weight": [128, 32],
              "model.layers.0.mlp.down_proj.weight": [32, 64],
              "model.layers.0.input_layernorm.weight": [32],
              "model.embed_tokens.weight": [100, 32], "lm_head.weight": [100, 32],
              # a model saved with PEFT's layers still wrapped
              "model.layers.1.mlp.down_proj.base_layer.weight": [32, 64],
              "model.layers.1.mlp.down_proj.lora_A.default.weight": [8, 64]}
    names = linear_names(shapes)
    assert names == ["down_proj", "gate_up_proj", "qkv_proj"]
    assert resolve(["all-linear"], names) == names
    # the default: every projection, by this model's names
    assert resolve(DEFAULT_TARGETS, names) == ["qkv_proj", "gate_up_proj", "down_proj"]
    assert resolve(["qkv_proj"], names) == ["qkv_proj"]
    with pytest.raises(UsageError, match="q_proj: no such linear module.*gate_up_proj"):
        resolve(["q_proj"], names)


def test_config_accepts_toml_and_flags(tmp_path):
    from edge_tune.config import build

    toml = tmp_path / "run.toml"
    toml.write_text('[train]\ndata = "x.jsonl"\ndora = true\nlora_dropout = 0.05\n'
                    'target_modules = ["q_proj", "v_proj"]\nreport-to = "none"\n')
    cfg = build(toml)
    assert (cfg.dora, cfg.lora_dropout, cfg.target_modules, cfg.report_to) == \
        (True, 0.05, ["q_proj", "v_proj"], "none")
    cfg = build(toml, target_modules="all-linear", rslora=True)
    assert cfg.target_modules == ["all-linear"] and cfg.rslora


def test_planner_counts_the_variant():
    from edge_tune import planner
    from edge_tune.config import TrainConfig

    shape = planner.ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128,
                               vocab=1000)
    seven = planner.lora_params(shape, 8, TrainConfig().target_modules)
    assert planner.lora_params(shape, 8, ["all-linear"]) == seven
    assert planner.lora_params(shape, 8, ["q_proj"]) == 2 * 8 * (64 + 64)
    assert planner.lora_params(shape, 8, ["q_proj"], dora=True) == 2 * (8 * (64 + 64) + 64)
    machine = planner.Machine(budget_bytes=8 * 2**30, physical_cores=2)
    cfg = TrainConfig(seq_len=64, batch_size=4)
    plain = planner.estimate(shape, "cpu", cfg, machine)
    dora = planner.estimate(shape, "cpu", TrainConfig(seq_len=64, batch_size=4, dora=True),
                            machine)
    assert dora.seconds_per_step > plain.seconds_per_step


# --- unsloth: the mapping, and its Trainer loop on the CPU with DoRA + rsLoRA ------------------


def test_unsloth_mapping_passes_the_variant():
    from edge_tune.training.backends import unsloth as uq
    from edge_tune.config import TrainConfig

    kw = uq.peft_kwargs(TrainConfig(rslora=True, dora=True, lora_dropout=0.05,
                                    target_modules=["q_proj", "v_proj"]))
    assert (kw["use_rslora"], kw["use_dora"], kw["lora_dropout"], kw["target_modules"]) == \
        (True, True, 0.05, ["q_proj", "v_proj"])
    assert uq.peft_kwargs(TrainConfig(target_modules=["all-linear"]))["target_modules"] == \
        "all-linear"  # PEFT's own keyword, as Unsloth passes it on
    plain = uq.peft_kwargs(TrainConfig())
    assert (plain["use_rslora"], plain["use_dora"], plain["lora_dropout"]) == (False, False, 0.0)


def test_unsloth_trainer_loop_trains_dora_rslora_on_cpu():
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from edge_tune.training.backends import unsloth as uq
    from edge_tune.config import TrainConfig
    from edge_tune.data.template import IGNORE, Example

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=128,
                                         initializer_range=0.3))
    cfg = TrainConfig(rank=4, alpha=8.0, rslora=True, dora=True, lora_dropout=0.05,
                      batch_size=4, max_steps=6, lr=2e-2, warmup_steps=1,
                      target_modules=["q_proj", "v_proj", "down_proj"])
    kw = uq.peft_kwargs(cfg)
    lora = LoraConfig(task_type="CAUSAL_LM", **{k: v for k, v in kw.items() if k not in (
        "use_gradient_checkpointing", "random_state")})
    model = get_peft_model(model, lora)
    magnitudes = {n: p.detach().clone() for n, p in model.named_parameters()
                  if "lora_magnitude_vector" in n}
    assert magnitudes and model.peft_config["default"].use_rslora
    rng = random.Random(0)
    examples = []
    for _ in range(4):
        prompt = [rng.randint(3, 63) for _ in range(rng.randint(4, 8))]
        examples.append(Example(prompt + [7, 8, 9, 2], [IGNORE] * len(prompt) + [7, 8, 9, 2]))
    events: list = []
    result = uq.fit(model, {"config": cfg, "examples": examples, "pad_id": 0}, events.append,
                    "none")
    losses = [e.loss for e in events if getattr(e, "split", None) == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0] and result.steps == 6
    moved = [n for n, p in model.named_parameters() if n in magnitudes and
             not torch.equal(p.detach(), magnitudes[n])]
    assert moved  # the DoRA magnitudes are trained too
