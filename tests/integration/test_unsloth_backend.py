"""The unsloth backend on a CPU box: argument mappings, the Trainer loop (real transformers +
PEFT on a tiny random Llama, without Unsloth), import hygiene, the nvidia-smi parser and the
one-line refusal of ``--backend unsloth`` without a GPU.

Unsloth itself needs an NVIDIA GPU; ``benchmarks/gpu_check.sh`` runs the real thing there."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers.cli import REPO, assert_one_line_error, run_cli

from edge_tune.training import registry
from edge_tune.training.backends import cpu
from edge_tune.training.backends import unsloth as uq
from edge_tune.data.template import IGNORE, Example
from edge_tune.errors import EdgeTuneError
from edge_tune.hardware import (
    CudaGpu,
    Hardware,
    parse_cuda_version,
    parse_gpu_query,
    torch_cuda_version,
)
from edge_tune.render.doctor import gpu_line
from tests.helpers.unsloth_model import config, tiny_peft_llama


# --- argument mapping -------------------------------------------------------------------------


def test_step_counts_match_the_cpu_backend():
    # 20 examples, batch 4, 2 epochs: 5 steps an epoch, 10 in all; warm-up capped at total//10.
    assert uq.step_counts(config(batch_size=4, epochs=2.0, warmup_steps=5), 20) == (10, 5, 1)
    # grad_accum: an optimizer step takes batch_size x grad_accum examples.
    assert uq.step_counts(config(batch_size=4, grad_accum=2, epochs=1.0), 20) == (3, 3, 0)
    # max_steps wins over epochs.
    assert uq.step_counts(config(max_steps=100, warmup_steps=5), 7) == (100, 1, 5)
    assert uq.step_counts(config(max_steps=30, warmup_steps=5), 7)[2] == 3


def test_from_pretrained_kwargs():
    kw = uq.from_pretrained_kwargs(config(seq_len=1024), "/models/smollm2")
    assert kw == {"model_name": "/models/smollm2", "max_seq_length": 1024, "load_in_4bit": True,
                  "dtype": None, "trust_remote_code": False}
    assert uq.from_pretrained_kwargs(config(precision="bf16"), "m", True)["dtype"] == "bfloat16"


def test_precision_mapping():
    assert uq.compute_dtype("auto", True) is None and uq.compute_dtype("auto", False) is None
    assert uq.mixed_precision(None, True) == "bf16"
    assert uq.mixed_precision(None, False) == "fp16"  # T4 / V100: no bf16
    assert uq.mixed_precision("bfloat16", True) == "bf16"
    with pytest.raises(EdgeTuneError, match="no bf16"):
        uq.compute_dtype("bf16", False)
    with pytest.raises(EdgeTuneError, match="--precision fp32"):
        uq.compute_dtype("fp32", True)


def test_peft_kwargs():
    cfg = config(rank=8, alpha=16.0, seed=7, target_modules=["q_proj", "v_proj"])
    kw = uq.peft_kwargs(cfg)
    assert kw == {"r": 8, "lora_alpha": 16.0, "target_modules": ["q_proj", "v_proj"],
                  "lora_dropout": 0.0, "bias": "none", "use_gradient_checkpointing": "unsloth",
                  "random_state": 7, "use_rslora": False, "use_dora": False}
    assert kw["target_modules"] is not cfg["target_modules"]  # a copy: Unsloth may edit it
    assert uq.peft_kwargs({**cfg, "rslora": True})["use_rslora"] is True
    # Everything but Unsloth's own two arguments is a PEFT LoraConfig field, meaning the same.
    from peft import LoraConfig

    lora = LoraConfig(**{k: v for k, v in kw.items()
                         if k not in ("use_gradient_checkpointing", "random_state")})
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (8, 16.0, {"q_proj", "v_proj"})


def test_training_args_kwargs_build_real_training_arguments(tmp_path):
    from transformers import TrainingArguments

    cfg = config(batch_size=3, grad_accum=4, lr=2e-4, seed=11)
    kw = uq.training_args_kwargs(cfg, 50, str(tmp_path), "bf16")
    assert (kw["bf16"], kw["fp16"]) == (True, False)
    assert uq.training_args_kwargs(cfg, 50, str(tmp_path), "fp16")["fp16"] is True
    args = TrainingArguments(**uq.training_args_kwargs(cfg, 50, str(tmp_path), "none"))
    assert args.per_device_train_batch_size == 3 and args.gradient_accumulation_steps == 4
    assert args.max_steps == 50 and args.learning_rate == 2e-4
    assert args.weight_decay == 0.0 and args.max_grad_norm == 1.0
    assert args.optim == "adamw_torch" and args.seed == 11 and args.data_seed == 11
    assert args.logging_steps == 1 and not args.remove_unused_columns


def test_lr_schedule_is_the_cpu_backends():
    import torch

    total, warmup, peak = 40, 4, 1e-3
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, uq.lr_factor(total, warmup))
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([cpu.lr_at(s, total, peak, warmup) for s in range(total)])
    assert seen[0] == pytest.approx(peak / warmup)  # not 0 as in transformers' own warm-up
    assert seen[-1] == pytest.approx(0.1 * peak, rel=0.02)


def test_pad_batch():
    batch = uq.pad_batch([Example([5, 6, 7], [IGNORE, 6, 7]), Example([1] * 10, [1] * 10)], 0)
    assert batch["input_ids"].shape == (2, 16)  # 10 rounded up to a multiple of 8
    assert batch["attention_mask"].sum(1).tolist() == [3, 10]
    assert batch["labels"][0].tolist() == [IGNORE, 6, 7] + [IGNORE] * 13
    assert batch["input_ids"][0, 3:].eq(0).all()


# --- the Trainer loop, for real, on the CPU ---------------------------------------------------


def test_fit_trains_with_edge_tune_events_on_cpu():
    rng = random.Random(0)
    examples = []
    for _ in range(6):  # prompt tokens (no loss) then an answer to learn
        n = rng.randint(6, 12)
        prompt = [rng.randint(3, 63) for _ in range(n)]
        answer = [7, 8, 9, 10, 11, 2]
        examples.append(Example(prompt + answer, [IGNORE] * n + answer))
    val = examples[:2]
    events = []
    job = {"config": config(batch_size=6, max_steps=12, lr=2e-2, warmup_steps=5,
                            eval_every=6),
           "examples": examples, "val_examples": val, "pad_id": 0}
    result = uq.fit(tiny_peft_llama(), job, events.append, "none")

    train = [e for e in events if getattr(e, "split", None) == "train"]
    vals = [e for e in events if getattr(e, "split", None) == "val"]
    assert [m.step for m in train] == list(range(1, 13))
    assert [m.step for m in vals] == [6, 12]
    assert all(m.total_steps == 12 and m.tokens_per_second > 0 for m in train)
    assert [m.learning_rate for m in train] == pytest.approx(
        [cpu.lr_at(s, 12, 2e-2, 1) for s in range(12)])
    assert train[-1].loss < 0.5 * train[0].loss  # it learns the answer
    assert vals[-1].loss < vals[0].loss
    # Every step sees all six examples (batch 6): tokens are counted exactly.
    assert result.tokens == 12 * sum(len(e.input_ids) for e in examples)
    assert result.steps == 12 and result.val_loss == vals[-1].loss
    assert set(result.to_dict()) >= {"final_loss", "tokens_per_second", "train_seconds",
                                     "precision", "trainable_parameters"}


def test_fit_under_torchrun_matches_one_process_with_the_same_global_batch(tmp_path):
    """The Trainer loop as 2 gloo ranks (each reading half the data, DDP all-reducing the LoRA
    gradients) against one process with two micro-batches per step: the same examples at every
    step, so the same losses and LoRA weights. On CUDA the same code runs over NCCL."""
    import torch
    from safetensors.torch import load_file

    # a module of the tests package, run from the repository root where `tests` imports
    script = "tests.helpers.unsloth_fit_ranks"
    one, two = tmp_path / "one", tmp_path / "two"
    for cmd in ([sys.executable, "-m", script, str(one), "2"],
                [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                 "--standalone", "-m", script, str(two), "1"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False,
                              cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((one / "result.json").read_text())
    b = json.loads((two / "result.json").read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert (a["shard"], b["shard"], a["examples"], b["examples"]) == (24, 12, 24, 24)
    assert len(a["losses"]) == len(b["losses"]) == 10
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-4)
    assert a["losses"][-1] < 0.7 * a["losses"][0]  # it trained
    assert b["tokens"] == a["tokens"]  # summed over both ranks
    wa, wb = load_file(str(one / "lora.safetensors")), load_file(str(two / "lora.safetensors"))
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-6)


# --- hygiene, hardware, refusal ---------------------------------------------------------------


def test_importing_the_backend_imports_no_heavy_library():
    code = ("import sys, json\nimport edge_tune.training.backends.unsloth, "
            "edge_tune.training.registry, edge_tune.hardware\nfrom edge_tune import api\n"
            "api.doctor()\n"
            "print(json.dumps(sorted(m for m in ('torch', 'unsloth', 'transformers', 'peft', "
            "'trl', 'bitsandbytes') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# Lines in the format `nvidia-smi --query-gpu=name,memory.total,memory.free,compute_cap,
# driver_version --format=csv,noheader,nounits` prints (MiB; one GPU a line).
SMI_QUERY = """NVIDIA H100 80GB HBM3, 81559, 80994, 9.0, 550.54.15
Tesla T4, 15360, 14913, 7.5, 535.183.01
Tesla P100-PCIE-16GB, 16384, 16280, 6.0, 535.183.01
NVIDIA A100-SXM4-40GB MIG 1g.5gb, [N/A], [N/A], 8.0, 550.54.15
"""
SMI_HEADER = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
"""


def test_parse_nvidia_smi():
    assert parse_cuda_version(SMI_HEADER) == "12.4"
    assert parse_cuda_version("no header") == ""
    gpus = parse_gpu_query(SMI_QUERY, "12.4")
    assert [g.name for g in gpus] == ["NVIDIA H100 80GB HBM3", "Tesla T4", "Tesla P100-PCIE-16GB"]
    h100, t4, p100 = gpus
    assert (h100.vram_gib, h100.vram_free_gib, h100.compute_capability, h100.bf16) == \
        (79.6, 79.1, "9.0", True)
    assert (h100.driver, h100.cuda) == ("550.54.15", "12.4")
    assert t4.bf16 is False and t4.compute_major_minor == (7, 5)
    assert p100.compute_major_minor == (6, 0)
    assert parse_gpu_query("") == [] and parse_gpu_query("garbage, 1") == []
    assert "79.1 GiB free" in gpu_line(vars(h100)) and "CUDA 12.4" in gpu_line(vars(h100))
    assert "driver 535.183.01" in gpu_line(vars(t4))


def hw(gpus) -> Hardware:
    return Hardware(os="Linux", python="3.11", cpu_model="x", arch="x86_64", physical_cores=2,
                    logical_cores=2, ram_total_gib=24, ram_available_gib=20, disk_free_gib=50,
                    cuda_gpus=gpus)


def test_unsloth_reasons():
    def reason(h):
        return {a.name: a for a in registry.availability(h)}["unsloth"]

    assert "NVIDIA GPU" in reason(hw([])).reason
    old = reason(hw(parse_gpu_query(SMI_QUERY)[2:]))
    assert not old.available and "unsupported GPU" in old.reason and "6.0" in old.reason
    if torch_cuda_version() is None:  # a CPU torch (CI): with a good GPU that is the reason
        here = reason(hw(parse_gpu_query(SMI_QUERY)[:1]))
        assert not here.available and "CPU-only build" in here.reason


def test_unsloth_available_when_everything_is_there(monkeypatch):
    monkeypatch.setattr(registry, "torch_cuda_version", lambda: "12.4")
    monkeypatch.setattr(registry, "missing_modules", lambda *m: [])
    h = hw(parse_gpu_query(SMI_QUERY)[:2])
    assert registry.choose("auto", h)[0] == "unsloth"
    assert registry.BACKENDS["unsloth"].entry == "edge_tune.training.backends.unsloth:train"
    monkeypatch.setattr(registry, "missing_modules", lambda *m: [x for x in m if x == "unsloth"])
    assert "pip install 'edge-tune[cuda]'" in {a.name: a for a in registry.availability(h)}[
        "unsloth"].reason


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_backend_unsloth_without_gpu_is_one_line(tmp_path, demo_jsonl):
    proc = run_cli("train", "--data", str(demo_jsonl), "--backend", "unsloth", "--out",
                   str(tmp_path / "run"), "--max-steps", "1")
    assert_one_line_error(proc, "--backend unsloth", "not available here")
    assert not (tmp_path / "run").exists()


def test_cuda_gpu_positional_fields_unchanged():
    g = CudaGpu("H100", 80.0, "9.0", True)  # older callers build it with four fields
    assert g.vram_free_gib is None and g.driver == ""


# --- models given as HF weights: the GGUF base -------------------------------------------------


def test_unquantized_hub_id():
    from edge_tune.models import unquantized_hub_id

    assert unquantized_hub_id("unsloth/Llama-3.2-1B-Instruct-bnb-4bit") == \
        "unsloth/Llama-3.2-1B-Instruct"
    assert unquantized_hub_id("unsloth/Llama-3.2-1B-Instruct-unsloth-bnb-4bit") == \
        "unsloth/Llama-3.2-1B-Instruct"
    assert unquantized_hub_id("unsloth/SmolLM2-135M-Instruct-bnb-4bit") == \
        "unsloth/SmolLM2-135M-Instruct"
    assert unquantized_hub_id("unsloth/mistral-7b-v0.3-BNB-4bit") == "unsloth/mistral-7b-v0.3"
    assert unquantized_hub_id("unsloth/Llama-3.2-1B-Instruct") is None
    assert unquantized_hub_id("someone/Llama-3.2-1B-bnb-4bit") is None  # not Unsloth's naming
    assert unquantized_hub_id("unsloth/x-bnb-4bit-GGUF") is None


def test_hf_content_key(tmp_path):
    from edge_tune.models import hf_content_key

    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"x" * 3_000_000)
    key = hf_content_key(tmp_path)
    assert key == hf_content_key(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x" * 2_999_999 + b"y")
    assert hf_content_key(tmp_path) != key
    (tmp_path / "model.safetensors").write_bytes(b"x" * 3_000_000)
    (tmp_path / "config.json").write_text('{"a": 2}')
    assert hf_content_key(tmp_path) != key


def test_hf_model_gets_a_converted_gguf_base(tmp_path, demo_jsonl, hf_dir):
    """An HF directory has no GGUF: train converts one (cached by content), exports the adapter
    against it, verifies it in llama.cpp, and the manifest says which base and how."""
    from tests.helpers.family_models import build_tiny

    from edge_tune.adapters import converted_base as _converted_base
    from edge_tune.fsutil import sha256_file

    model = build_tiny("llama", tmp_path / "tiny", hf_dir).resolve()
    data = tmp_path / "data.jsonl"
    data.write_text("".join(demo_jsonl.read_text().splitlines(keepends=True)[:12]))
    proc = run_cli("train", "--data", str(data), "--model", str(model), "--backend", "cpu",
                   "--max-steps", "2", "--batch-size", "4", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    base = man["base"]
    assert base["gguf_source"] == "converted" and base["gguf_from"] == str(model)
    assert base["sha256"] == sha256_file(base["gguf"])
    assert man["adapter"]["gguf"] == "adapter.gguf" and (tmp_path / "run/adapter.gguf").is_file()
    # Cached by content: the same weights find the same file, without converting again.
    events = []
    again = {"hf_dir": str(model)}
    assert _converted_base(again, events.append) == Path(base["gguf"])
    assert again["sha256"] == base["sha256"] and not events
    # The adapter runs on the converted base in llama.cpp: chat uses the manifest's base.
    chat = run_cli("chat", "--adapter", str(tmp_path / "run"), "--prompt", "Hi", "--max-tokens",
                   "4")
    assert chat.returncode == 0, chat.stderr[-2000:]


def test_gpu_check_script_is_valid_and_fails_loudly_without_a_gpu():
    script = REPO / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    text = script.read_text()
    assert "set -euo pipefail" in text and "--backend unsloth" in text
    if shutil.which("nvidia-smi") is None:  # stops before touching anything
        proc = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                              check=False, env={"PATH": "/usr/bin:/bin"})
        assert proc.returncode == 1 and "needs an NVIDIA GPU" in proc.stderr


def test_worker_imports_unsloth_before_anything_else():
    """Unsloth must patch transformers before it is imported: the worker's first act for
    ``--backend unsloth`` is importing it (here it is not installed, so that is where it
    stops, with transformers and torch still unimported)."""
    code = ("import sys\nfrom edge_tune.training import worker\n"
            "job = {'backend': 'unsloth', 'model_ref': {'spec': 'x', 'gguf': None, "
            "'hf_dir': '/nonexistent', 'hub_id': None}}\n"
            "try:\n    worker.run(job, print)\n"
            "except ModuleNotFoundError as exc:\n"
            "    print(exc.name, 'transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    if registry.missing_modules("unsloth"):
        assert out.stdout.split() == ["unsloth", "False", "False"]
