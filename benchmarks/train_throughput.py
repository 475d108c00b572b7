"""CPU LoRA training throughput: edge-tune's own loop vs ``transformers.Trainer`` + PEFT.

    python benchmarks/train_throughput.py [--steps 20] [--batch-size 8] [--seq-len 256]
                                          [--rank 16] [--sides edgetune,hf,hf-bf16]

``edge_tune.backends.cpu`` trains with a plain loop instead of the obvious alternative, HF
``Trainer`` + PEFT. This script checks that the choice pays off, on this machine, in one run.

What is held equal: the model (the embedded default, SmolLM2-135M-Instruct, dequantized to HF
layout), the tokenized examples (the demo chat data, tokenized once here and handed to every
side), LoRA rank/alpha/target modules (all attention and MLP projections, dropout 0), batch
size, max sequence length, learning rate and warm-up, max steps, seed, torch threads (physical
cores). Everything else is each side's own default:

* ``edgetune``: ``edge_tune.backends.cpu.train`` as the product runs it (precision "auto":
  bf16 base weights + bf16 autocast where the CPU does bf16 natively, length-grouped batches,
  logits only where there is a loss, eager attention).
* ``hf``: ``Trainer`` in its CPU defaults: fp32, SDPA attention, random batches padded to the
  longest in the batch, full logits. ``use_cpu=True``, no eval, no saving, no reporting.
* ``hf-bf16``: the same with ``bf16=True`` (fp32 master weights, bf16 autocast): the one-flag
  tuning an HF user would try first. Skipped with a note if it fails on this CPU.

Throughput, measured identically on every side: tokens = non-padding input tokens (sum of the
attention mask) of each optimizer step; time = wall clock between the end of the last warm-up
step and the end of the last step (so data loading, the optimizer and per-step overhead are
included for everyone); the first ``--warmup`` steps are excluded. Note that the two sides
draw different batches (edge-tune groups by length, Trainer samples at random), so the token
totals differ a little; tokens/s is comparable, and the padding column shows how much of the
computed batch was padding.

Peak memory: each side runs in its own fresh subprocess (this script re-invoked with
``--side``) and reports ``getrusage(RUSAGE_SELF).ru_maxrss`` at exit: model load included.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

SIDES = {"edgetune": "edge-tune loop", "hf": "HF Trainer+PEFT (fp32)",
         "hf-bf16": "HF Trainer+PEFT (bf16=True)"}
MARK = "@@RESULT "


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()  # wall clock, CPU time of all threads


def summarize(ends: list[tuple[float, float]], tokens: list[tuple[int, int]],
              losses: list[float], warmup: int, threads: int) -> dict:
    """tokens/s over the steps after ``warmup`` (``ends``: a stamp() at the end of each step);
    final loss averaged like edge-tune's own result."""
    w = warmup
    real = sum(t for t, _ in tokens[w:len(ends)])
    computed = sum(c for _, c in tokens[w:len(ends)])
    wall, cpu = ends[-1][0] - ends[w - 1][0], ends[-1][1] - ends[w - 1][1]
    tail = losses[-max(1, min(10, len(losses) // 5)):]
    return {"steps": len(ends), "timed_steps": len(ends) - w, "timed_tokens": real,
            "tokens_per_second": real / wall, "padding": 1 - real / computed,
            "cpu_busy": cpu / wall / threads,
            "first_loss": losses[0], "final_loss": sum(tail) / len(tail),
            "tokens_per_step": [t for t, _ in tokens[:len(ends)]]}


def run_edgetune(job: dict) -> dict:
    from edge_tune.backends import cpu
    from edge_tune.config import TrainConfig
    from edge_tune.data.template import Example
    from edge_tune.events import Metric

    tokens, ends, losses = [], [], []
    collate, collate_packed = cpu.collate, cpu.collate_packed

    def counting_collate(examples, pad_id):  # the loop looks collate up at call time
        ids, labels, mask = collate(examples, pad_id)
        tokens.append((int(mask.sum()), mask.numel()))
        return ids, labels, mask

    def counting_packed(examples, pad_id, capacity):  # --pack, the default
        ids, labels, mask, positions, n = collate_packed(examples, pad_id, capacity)
        tokens.append((n, ids.numel()))
        return ids, labels, mask, positions, n

    def emit(event):  # called once per optimizer step, after the step
        if isinstance(event, Metric):
            ends.append(stamp())
            losses.append(event.loss)

    cpu.collate, cpu.collate_packed = counting_collate, counting_packed
    a = job["args"]
    cfg = TrainConfig(data=job["data"], max_steps=a["steps"], batch_size=a["batch_size"],
                      rank=a["rank"], alpha=a["alpha"], seq_len=a["seq_len"], lr=a["lr"],
                      seed=a["seed"], warmup_steps=a["lr_warmup"], pack=not a["no_pack"])
    with tempfile.TemporaryDirectory() as adapter_dir:
        result = cpu.train({"config": cfg.to_dict(), "hf_dir": job["hf_dir"],
                            "examples": [Example(*e) for e in job["examples"]],
                            "pad_id": job["pad_id"], "physical_cores": job["threads"],
                            "cpu_has_bf16": job["cpu_has_bf16"], "adapter_dir": adapter_dir},
                           emit)
    return {**summarize(ends, tokens, losses, a["warmup"], job["threads"]),
            "precision": result["precision"]}


def run_hf(job: dict, bf16: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from edge_tune.backends.cpu import collate
    from edge_tune.data.template import Example

    a = job["args"]
    torch.set_num_threads(job["threads"])
    tokens, ends, losses = [], [], []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(stamp())

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs["attention_mask"]
            tokens.append((int(mask.sum()), mask.numel()))
            loss = super().training_step(model, inputs, num_items_in_batch)
            losses.append(loss)  # a detached tensor: read after training, no extra sync
            return loss

    def collator(features):  # right-padding to the longest in the batch, labels -100
        ids, labels, mask = collate([Example(*f) for f in features], job["pad_id"])
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    model = AutoModelForCausalLM.from_pretrained(job["hf_dir"], dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(
        r=a["rank"], lora_alpha=a["alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, use_cpu=True, bf16=bf16, max_steps=a["steps"],
            per_device_train_batch_size=a["batch_size"], learning_rate=a["lr"],
            lr_scheduler_type="cosine", warmup_steps=min(a["lr_warmup"], a["steps"] // 10),
            weight_decay=0.0, max_grad_norm=1.0, seed=a["seed"], report_to=[],
            save_strategy="no", eval_strategy="no", logging_steps=10**6, disable_tqdm=True,
            dataloader_num_workers=0, remove_unused_columns=False)
        trainer = CountingTrainer(model=model, args=args, train_dataset=job["examples"],
                                  data_collator=collator, callbacks=[Timer()])
        trainer.train()
    return {**summarize(ends, tokens, [float(x) for x in losses], a["warmup"],
                         job["threads"]),
            "precision": "bf16 autocast" if bf16 else "fp32"}


def child(side: str, job_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    result = run_edgetune(job) if side == "edgetune" else run_hf(job, bf16=side == "hf-bf16")
    result["peak_rss_gib"] = peak_rss_gib()
    print(MARK + json.dumps(result), flush=True)


def prepare(args) -> dict:
    """Tokenize the demo data once, with edge-tune's own template code, for every side."""
    from transformers import AutoTokenizer

    from edge_tune import demo, hardware, models
    from edge_tune.data.formats import read_jsonl
    from edge_tune.data.template import encode

    hf_dir = str(models.dequantized_copy(models.default_gguf()))
    tok = AutoTokenizer.from_pretrained(hf_dir)
    data = demo.demo_data()
    examples = [encode(tok, r.messages, args.seq_len) for r in read_jsonl(data)]
    examples = [(e.input_ids, e.labels) for e in examples if e.n_trained]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    hw = hardware.probe()
    return {"args": vars(args), "hf_dir": hf_dir, "data": str(data), "examples": examples,
            "pad_id": int(pad or 0), "threads": hw.physical_cores,
            "cpu_has_bf16": hw.has_bf16_cpu, "cpu": hw.cpu_model}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="default: 2 x rank")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-warmup", type=int, default=5, help="LR warm-up steps (edge-tune rule)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--sides", default="edgetune,hf,hf-bf16")
    p.add_argument("--no-pack", action="store_true",
                   help="edge-tune side with length-grouped padded batches instead of packing")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the median "
                   "tok/s of each side is reported (this VM's speed drifts 10-20%%)")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return child(args.side, args.job)
    args.alpha = args.alpha or 2.0 * args.rank
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = set(sides) - set(SIDES)
    if unknown or not 0 < args.warmup < args.steps:
        p.error(f"unknown side(s) {sorted(unknown)}" if unknown else "need 0 < --warmup < --steps")

    job = prepare(args)
    n = [len(e[0]) for e in job["examples"]]
    print(f"CPU: {job['cpu']}; {job['threads']} threads; native bf16: {job['cpu_has_bf16']}")
    print(f"model: {job['hf_dir']}\ndata: {len(n)} examples, {sum(n) / len(n):.0f} tokens mean, "
          f"{max(n)} max (seq_len {args.seq_len})")
    print(f"steps {args.steps} (first {args.warmup} untimed), batch {args.batch_size}, "
          f"LoRA r={args.rank} alpha={args.alpha:g}, lr {args.lr:g}, seed {args.seed}\n")

    runs: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        job_path = os.path.join(tmp, "job.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        for round_ in range(1, args.repeats + 1):
            for side in sides:  # interleaved, so slow drift of the machine hits every side
                print(f"round {round_}: running {SIDES[side]} ...", end=" ", flush=True)
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--side",
                                       side, "--job", job_path], capture_output=True, text=True)
                lines = [l for l in proc.stdout.splitlines() if l.startswith(MARK)]
                if proc.returncode or not lines:
                    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                    print(f"FAILED (exit {proc.returncode}): {tail}")
                    continue
                runs[side].append(json.loads(lines[-1][len(MARK):]))
                print(f"{time.perf_counter() - t0:.0f}s, "
                      f"{runs[side][-1]['tokens_per_second']:.0f} tok/s")
    results: dict[str, dict] = {}
    for side, rs in runs.items():
        if rs:
            rs = sorted(rs, key=lambda r: r["tokens_per_second"])
            results[side] = {**rs[len(rs) // 2],
                             "peak_rss_gib": max(r["peak_rss_gib"] for r in rs)}

    print(f"\n{'side':<30}{'precision':>14}{'tok/s':>8}{'peak RSS':>10}{'padding':>9}"
          f"{'CPU busy':>10}{'loss first->final':>19}")
    for side, r in results.items():
        print(f"{SIDES[side]:<30}{r['precision']:>14}{r['tokens_per_second']:>8.0f}"
              f"{r['peak_rss_gib']:>7.2f}GiB{r['padding']:>9.0%}{r['cpu_busy']:>10.0%}"
              f"{r['first_loss']:>10.3f} ->{r['final_loss']:>6.3f}")
    if any(r["cpu_busy"] < 0.85 for r in results.values()):
        print("WARNING: a side kept the CPU busy < 85% of the time: something else was probably "
              "running; rerun on an idle machine")
    for side, r in results.items():
        print(f"  {side}: {r['timed_tokens']} tokens over {r['timed_steps']} timed steps; "
              f"tokens/step {r['tokens_per_step']}")
    if "edgetune" in results:
        e = results["edgetune"]
        print()
        for side in ("hf", "hf-bf16"):
            if side in results:
                h = results[side]
                print(f"edge-tune vs {SIDES[side]}: "
                      f"{e['tokens_per_second'] / h['tokens_per_second']:.2f}x tokens/s, "
                      f"{e['peak_rss_gib'] / h['peak_rss_gib']:.2f}x peak RSS")


if __name__ == "__main__":
    main()
