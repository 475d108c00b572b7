"""The planner: model arithmetic against real models, fitting rules, and train's use of it."""

from __future__ import annotations

import dataclasses
import json

import pytest
from tests.helpers.cli import run_cli

from edge_tune import planner
from edge_tune.config import TrainConfig

GIB = planner.GIB
SMOL = planner.ModelShape(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, ffn=1536,
                          vocab=49152, tied=True)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**kw)


def _machine(gib: float = 64.0, **kw) -> planner.Machine:
    return planner.Machine(budget_bytes=gib * GIB, physical_cores=2, cpu_bf16=True, **kw)


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_and_lora_counts_match_real_models(tied):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=96, intermediate_size=200, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, vocab_size=500,
                         tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    shape = planner.shape_from_hf_config(config.to_dict())
    assert shape.params == sum(p.numel() for p in model.parameters())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert planner.lora_params(shape, 8, targets) == trainable


def test_default_model_shape_from_its_gguf(default_gguf):
    from edge_tune import models
    from edge_tune.planner import model_shape

    shape = model_shape(models.resolve(str(default_gguf)))
    assert shape == SMOL.__class__(**{**SMOL.__dict__, "file_bytes": shape.file_bytes})
    assert 134e6 < shape.params < 136e6  # SmolLM2-135M


def test_memory_grows_with_the_batch_and_shrinks_with_checkpointing():
    m = _machine()
    small = planner.estimate(SMOL, "cpu", _cfg(batch_size=2), m)
    big = planner.estimate(SMOL, "cpu", _cfg(batch_size=8), m)
    ckpt = planner.estimate(SMOL, "cpu", _cfg(batch_size=8, grad_checkpoint=True), m)
    assert big.parts["activations"] > 3 * small.parts["activations"]
    assert ckpt.parts["activations"] < big.parts["activations"] / 4
    assert ckpt.seconds_per_step > big.seconds_per_step  # recomputation costs time
    fp32 = planner.estimate(SMOL, "cpu", _cfg(precision="fp32"), m)
    assert fp32.parts["weights"] == pytest.approx(2 * big.parts["weights"])
    qlora = planner.estimate(SMOL, "unsloth", _cfg(), m)
    assert qlora.parts["weights"] < big.parts["weights"] / 1.5  # 4-bit (embeddings in 16-bit)
    shorter = planner.estimate(SMOL, "cpu", _cfg(batch_size=8), m, longest=100)
    assert shorter.tokens_per_step == 800 and shorter.peak < big.peak


def test_a_run_that_fits_is_left_alone():
    plan = planner.fit(SMOL, "cpu", _cfg(), _machine(64))
    assert plan.fits and plan.changes == []
    assert (plan.config.batch_size, plan.config.grad_accum) == (8, 1)


def test_fitting_trades_batch_for_accumulation_first():
    full = planner.estimate(SMOL, "cpu", _cfg(), _machine()).peak
    half = planner.estimate(SMOL, "cpu", _cfg(batch_size=4), _machine()).peak
    plan = planner.fit(SMOL, "cpu", _cfg(), _machine((full + half) / 2 / GIB))
    assert plan.fits and (plan.config.batch_size, plan.config.grad_accum) == (4, 2)
    assert "same effective batch" in plan.changes[0] and len(plan.changes) == 1
    assert plan.config.seq_len == 512 and not plan.config.grad_checkpoint


def test_then_checkpointing_then_shorter_sequences():
    at_one = planner.estimate(SMOL, "cpu", _cfg(batch_size=1, seq_len=4096), _machine()).peak
    plan = planner.fit(SMOL, "cpu", _cfg(batch_size=2, seq_len=4096), _machine(at_one / GIB * 0.9))
    assert plan.fits and plan.config.batch_size == 1 and plan.config.grad_accum == 2
    assert plan.config.grad_checkpoint is True
    tight = planner.estimate(SMOL, "cpu", _cfg(batch_size=1, seq_len=1024, grad_checkpoint=True),
                             _machine()).peak
    plan = planner.fit(SMOL, "cpu", _cfg(batch_size=1, seq_len=4096), _machine(tight / GIB))
    assert plan.fits and plan.config.seq_len <= 1024
    assert any("seq-len 4096 ->" in c for c in plan.changes)


def test_nothing_fits_means_refusal_with_the_numbers():
    plan = planner.fit(SMOL, "cpu", _cfg(), _machine(0.3))
    assert not plan.fits and plan.estimate.peak > 0.3 * GIB


def test_unsloth_plans_its_4bit_base_from_the_backend_alone():
    """Unsloth loads every base in 4-bit NF4 (``load_in_4bit``): a TrainConfig for it plans
    4-bit weights (embeddings in 16-bit), not bf16 ones, with no setting to ask for it."""
    m = _machine(gpu_name="NVIDIA H100 80GB HBM3")
    qlora = planner.estimate(SMOL, "unsloth", _cfg(backend="unsloth", batch_size=1), m)
    bf16 = planner.estimate(SMOL, "cpu", _cfg(batch_size=1, precision="bf16"), m)
    assert (qlora.precision, bf16.precision) == ("nf4", "bf16")
    embed = SMOL.vocab * SMOL.hidden
    assert qlora.parts["weights"] == pytest.approx((SMOL.params - embed) * 0.55 + embed * 2)
    assert qlora.parts["weights"] < bf16.parts["weights"] / 2
    fast = planner.estimate(SMOL, "unsloth", _cfg(), m).seconds_per_step
    slow = planner.estimate(SMOL, "cpu", _cfg(), _machine()).seconds_per_step
    assert fast < slow / 20



_SETTINGS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


@dataclasses.dataclass
class _OnlyItsSettings(TrainConfig):
    """A TrainConfig that fails on reading any other name, even through ``getattr(cfg, name,
    default)`` (an AssertionError is no AttributeError): the bug class of ``quantize_4bit``
    (and of ``rslora`` before it), a setting read with a default that nothing ever sets."""

    def __getattribute__(self, name):
        if not name.startswith("__") and name not in _SETTINGS:
            raise AssertionError(f"the planner read {name!r}, which TrainConfig does not have")
        return super().__getattribute__(name)


@pytest.mark.parametrize("backend", ["cpu", "mlx", "unsloth"])
@pytest.mark.parametrize("settings", [{}, {"full": True, "precision": "fp32"},
                                      {"dora": True, "grad_checkpoint": True, "verify": False},
                                      {"method": "dpo", "pack": False, "batch_size": 3}])
def test_the_planner_reads_only_the_settings_train_config_has(backend, settings):
    cfg = _OnlyItsSettings(**settings)
    for budget in (64, 1.5, 0.3):  # fits as asked; after each change fit() makes; not at all
        plan = planner.fit(SMOL, backend, cfg, _machine(budget, gpu_name="H100"),
                           total_steps=10, longest=700)
        assert isinstance(plan.config, TrainConfig) and set(plan.to_dict()["settings"]) == \
            {"batch_size", "grad_accum", "seq_len", "grad_checkpoint"}
    with pytest.raises(AssertionError, match="quantize_4bit"):
        getattr(cfg, "quantize_4bit", True)  # the guard itself


def test_plan_command_json_on_the_default_model(demo_jsonl):
    proc = run_cli("plan", "--data", str(demo_jsonl), "--memory-gib", "1.5", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["backend"] == "cpu" and report["fits"]
    assert report["settings"]["batch_size"] * report["settings"]["grad_accum"] == 8
    assert report["estimate"]["peak_gib"] <= 1.5


def test_plan_loads_no_heavy_library(demo_jsonl):
    import subprocess
    import sys

    code = ("import sys, json\nfrom edge_tune import api\nfrom edge_tune.config import build\n"
            f"api.plan(build(None, data={str(demo_jsonl)!r}))\n"
            "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'mlx', 'llama_cpp') "
            "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_train_refuses_a_run_that_cannot_fit_before_loading_anything(demo_jsonl, tmp_path):
    proc = run_cli("train", "--data", str(demo_jsonl), "--memory-gib", "0.3", "--out",
                   str(tmp_path / "run"), timeout=120)
    # Progress lines may come first; the failure itself is one line, exit 2, no traceback.
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: loading this model for training needs ~"), last
    assert "GiB is available" in last
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_grpo_step_counts_its_rollouts_and_its_passes():
    """A GRPO step samples G completions per prompt in llama.cpp (each prompt evaluated,
    then one decode step per completion token) before the trainer's passes over G x (prompt +
    completion) tokens: at least G x completion-length single-token decodes' worth more
    than an SFT step of that batch, and more with longer completions."""
    G, L, prompt = 4, 16, 40
    machine = _machine()

    def step(**kw) -> float:
        cfg = _cfg(batch_size=G, num_generations=G, max_completion_length=L, seq_len=512, **kw)
        return planner.estimate(SMOL, "cpu", cfg, machine, 10, prompt).seconds_per_step

    decode = 2.0 * SMOL.params / (planner.CPU_FLOPS_PER_CORE["fp32"] * machine.physical_cores)
    sft = planner.estimate(SMOL, "cpu", _cfg(batch_size=G, seq_len=512, beta=0.0), machine, 10,
                           prompt + L).seconds_per_step
    grpo = step(method="grpo", beta=0.0)
    assert grpo >= sft + G * L * decode + G * prompt * decode + L * planner.ROLLOUT_STEP_SECONDS
    assert step(method="grpo", beta=0.04) > grpo  # the reference's forward pass
    assert planner.estimate(SMOL, "cpu", _cfg(method="grpo", batch_size=G, num_generations=G,
                                              max_completion_length=4 * L, seq_len=512),
                            machine, 10, prompt).seconds_per_step > 2 * grpo


@pytest.mark.parametrize("seconds,shown", [(0.0, "~0 min"), (11.0, "~1 min"), (60.0, "~1 min"),
                                           (61.0, "~2 min"), (434.0, "~8 min")])
def test_minutes_round_up(seconds, shown):
    assert planner.minutes_text(seconds) == shown
    plan = planner.fit(SMOL, "cpu", _cfg(max_steps=1), _machine())
    plan.estimate.seconds_per_step, plan.estimate.total_steps = seconds, 1
    assert f"{shown} for 1 steps" in planner.describe(plan)
