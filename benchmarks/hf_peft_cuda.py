"""Unsloth QLoRA vs HF Trainer + PEFT (bf16 LoRA and bitsandbytes 4-bit QLoRA), same run, CUDA.

    python benchmarks/hf_peft_cuda.py [--model M] [--data F] [--steps 60] [--repeats 3]

Three configurations train the same LoRA (edge-tune's rank/alpha/targets) on the same
tokenized examples (edge-tune's chat template and assistant-only labels), with the same seed,
batches, schedule and steps, through the same Trainer loop (``unsloth.fit``):

* ``unsloth``: what ``--backend unsloth`` runs (FastLanguageModel, 4-bit NF4, Unsloth's
  gradient checkpointing);
* ``hf-bf16``: transformers + PEFT, bf16 weights (fp16 where the GPU lacks bf16), SDPA,
  gradient checkpointing (non-reentrant);
* ``hf-4bit``: transformers + PEFT QLoRA, bitsandbytes NF4 with double quantization,
  ``prepare_model_for_kbit_training``, gradient checkpointing.

Each run is its own subprocess: Unsloth patches transformers when imported, so the HF
baselines must never see it. Runs are interleaved (round-robin over ``--repeats`` rounds) so a
noisy machine hurts every configuration alike; medians are reported. Speed is the median step
time after ``--skip`` warm-up steps (Triton compiles, allocator warms up); every configuration
trains on exactly the same batches, so step time ratios are tokens/s ratios. Memory is
``torch.cuda.max_memory_allocated()`` over the whole run (load + train).

Target (issue 5): Unsloth >= 1.8x HF+PEFT tokens/s at <= 0.6x peak VRAM.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("unsloth", "hf-bf16", "hf-4bit")
TARGET_SPEED, TARGET_VRAM = 1.8, 0.6


def child(args) -> None:
    """One configuration, one process: prints one JSON line."""
    if args.mode == "unsloth":
        import unsloth  # noqa: F401  (before transformers/peft: it patches them)
    import torch
    from transformers import AutoTokenizer

    from edge_tune.training.backends import unsloth as uq
    from edge_tune.training.worker import tokenize_records
    from edge_tune.config import TrainConfig
    from edge_tune.data.formats import read_records
    from edge_tune.events import Metric

    cfg = TrainConfig(data=args.data, max_steps=args.steps, batch_size=args.batch_size,
                      seq_len=args.seq_len, rank=args.rank, alpha=2.0 * args.rank,
                      lr=2e-4).to_dict()
    tok = AutoTokenizer.from_pretrained(args.model)
    records = [{"messages": r.messages, "text": r.text} for r in read_records(args.data).records]
    examples = tokenize_records(tok, records, args.seq_len, lambda e: None, "training")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    bf16_ok = torch.cuda.is_bf16_supported()
    half = torch.bfloat16 if bf16_ok else torch.float16
    precision = "bf16" if bf16_ok else "fp16"
    lora_kw = {k: v for k, v in uq.peft_kwargs(cfg).items()
               if k not in ("use_gradient_checkpointing", "random_state")}

    torch.manual_seed(cfg["seed"])
    if args.mode == "unsloth":
        from unsloth import FastLanguageModel

        load_kw = uq.from_pretrained_kwargs(cfg, args.model, bf16_ok)
        load_kw["dtype"] = half
        model, _ = FastLanguageModel.from_pretrained(**load_kw)
        model = FastLanguageModel.get_peft_model(model, **uq.peft_kwargs(cfg))
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        kw: dict = {"dtype": half, "device_map": {"": 0}, "attn_implementation": "sdpa"}
        if args.mode == "hf-4bit":
            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=half)
        model = AutoModelForCausalLM.from_pretrained(args.model, **kw)
        model.config.use_cache = False
        gc_kw = {"use_reentrant": False}
        if args.mode == "hf-4bit":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs=gc_kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kw)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_kw))

    stamps: list[float] = []

    def emit(event) -> None:
        if isinstance(event, Metric) and event.split == "train":
            stamps.append(time.perf_counter())

    job = {"config": cfg, "examples": examples, "val_examples": [], "pad_id": int(pad or 0)}
    result = uq.fit(model, job, emit, precision, half)
    steps = [b - a for a, b in itertools.pairwise(stamps)][args.skip:]
    step_s = statistics.median(steps) if steps else result.train_seconds / result.steps
    print(json.dumps({
        "mode": args.mode, "gpu": torch.cuda.get_device_name(0),
        "tokens_per_second": result.tokens / result.steps / step_s,
        "tokens_per_second_all": result.tokens_per_second, "median_step_s": step_s,
        "peak_vram_bytes": torch.cuda.max_memory_allocated(), "final_loss": result.final_loss,
        "steps": result.steps, "tokens": result.tokens}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF model directory (default: the embedded default model's "
                                    "dequantized copy)")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parent.parent
                                          / "edge_tune" / "assets" / "demo.jsonl"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the speed")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.model is None:
        from edge_tune import models

        args.model = str(models.dequantized_copy(models.default_gguf()))
    if args.mode:
        child(args)
        return 0

    modes = args.modes.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.repeats):
        for mode in modes:  # interleaved: the machine's noise falls on every mode alike
            cmd = [sys.executable, __file__, "--mode", mode, "--model", args.model,
                   "--data", args.data, "--steps", str(args.steps), "--skip", str(args.skip),
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                   "--rank", str(args.rank)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"hf_peft_cuda: {mode} failed (exit {proc.returncode})")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[mode].append(res)
            print(f"round {r + 1}/{args.repeats} {mode:8s} {res['tokens_per_second']:9.0f} tok/s "
                  f"{res['peak_vram_bytes'] / 2**30:6.2f} GiB peak  loss {res['final_loss']:.3f}",
                  flush=True)

    med = {m: {"tokens_per_second": statistics.median(x["tokens_per_second"] for x in v),
               "peak_vram_gib": statistics.median(x["peak_vram_bytes"] for x in v) / 2**30}
           for m, v in runs.items()}
    gpu = next(iter(runs.values()))[0]["gpu"]
    print(f"\nGPU: {gpu}; model {args.model}; {args.steps} steps, batch {args.batch_size}, "
          f"seq_len {args.seq_len}, r={args.rank}; medians of {args.repeats} interleaved runs")
    print(f"{'config':10s} {'tok/s':>9s} {'peak VRAM':>10s}")
    for m, v in med.items():
        print(f"{m:10s} {v['tokens_per_second']:9.0f} {v['peak_vram_gib']:8.2f} GiB")
    ratios = {}
    if "unsloth" in med:
        for base in (m for m in med if m != "unsloth"):
            speed = med["unsloth"]["tokens_per_second"] / med[base]["tokens_per_second"]
            vram = med["unsloth"]["peak_vram_gib"] / med[base]["peak_vram_gib"]
            ok = speed >= TARGET_SPEED and vram <= TARGET_VRAM
            ratios[base] = {"speed": speed, "vram": vram, "meets_target": ok}
            print(f"unsloth vs {base}: {speed:.2f}x tokens/s, {vram:.2f}x peak VRAM "
                  f"(target >= {TARGET_SPEED}x at <= {TARGET_VRAM}x: "
                  f"{'met' if ok else 'NOT met'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": gpu, "runs": runs, "medians": med,
                                               "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
