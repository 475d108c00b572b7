"""CPU LoRA training throughput and peak memory: edge-tune vs TRL ``SFTTrainer`` vs HF ``Trainer``.

    python benchmarks/train_throughput.py [--steps 12] [--repeats 2] [--quick]
                                          [--batch-size 8] [--seq-len 256] [--rank 16]
                                          [--sides edgetune,trl,hf,hf-bf16] [--no-bound]

``edge_tune.training.backends.cpu`` trains with a plain loop instead of what a user would pick instead:
TRL's ``SFTTrainer`` (``pip install trl``: the ``bench`` extra) or HF ``Trainer`` + PEFT. This
script checks that the choice pays off, on this machine, in one run, and says how close each
side gets to the machine's bf16 matmul bound (``benchmarks/matmul_bound.py``, measured in the
same run, between the sides, once per round).

What is held equal: the model (the embedded default, SmolLM2-135M-Instruct, dequantized to HF
layout), the data (``--examples`` short chats: the demo chat data, cycled to 256 records; for
edge-tune and HF Trainer tokenized once here with edge-tune's template code and handed over,
for TRL given as prompt-completion conversations that TRL tokenizes itself, as its users do),
LoRA rank/alpha/target modules (all attention and MLP projections, dropout 0), batch
size, max sequence length, learning rate and warm-up, max steps, seed, torch threads (physical
cores). Everything else is each side's own default:

* ``edgetune``: ``edge_tune.training.backends.cpu.train`` as the product runs it (precision "auto":
  bf16 base weights + bf16 autocast where the CPU does bf16 natively, length-grouped batches,
  logits only where there is a loss, eager attention).
* ``edgetune-gc`` (not run unless named in ``--sides``): the same with ``--grad-checkpoint``
  (each block recomputed in backward), the memory-saving setting.
* ``hf``: ``Trainer`` in its CPU defaults: fp32, SDPA attention, random batches padded to the
  longest in the batch, full logits. ``use_cpu=True``, no eval, no saving, no reporting.
* ``hf-bf16``: the same with ``bf16=True`` (fp32 master weights, bf16 autocast): the one-flag
  tuning an HF user would try first. Skipped with a note if it fails on this CPU.
* ``trl``: ``trl.SFTTrainer`` with ``bf16=True``, the model given by path and LoRA as
  ``peft_config`` (TRL loads fp32 weights and autocasts), prompt-completion data (prompt = the
  conversation up to its last assistant message, completion = that message), so the loss is on
  the answer only (TRL's ``completion_only_loss`` default for such data); ``max_length`` =
  ``--seq-len``, no packing, TRL's defaults otherwise (SDPA attention, its fused log-prob loss,
  ``gradient_checkpointing=True``: compare it with ``edgetune-gc`` too).
* ``trl-nogc`` (not run unless named in ``--sides``): the same with
  ``gradient_checkpointing=False``: TRL's default recomputes each block in backward.

Sides a user would pick instead are compared with edge-tune; the ratios printed first are
against TRL. The project's memory target: edge-tune's peak RSS <= 0.6x the lowest peak RSS of
the alternatives run; the last lines say where it stands.

Throughput, measured identically on every side: tokens = non-padding input tokens (sum of the
attention mask) of each optimizer step; time = wall clock between the end of the last warm-up
step and the end of the last step (so data loading, the optimizer and per-step overhead are
included for everyone); the first ``--warmup`` steps are excluded. tok/CPU-s: the same tokens
per second of the side's own CPU time, all threads: on a machine shared with other work it
moves less than tok/s (though cache and memory-bandwidth contention still reach it). The sides
draw different batches (edge-tune groups by length, Trainer samples at random), so the token
totals differ a little; tokens/s is comparable, and the padding column shows how much of the
computed batch was padding.

Peak memory: each side runs in its own fresh subprocess (this script re-invoked with
``--side``) and reports ``getrusage(RUSAGE_SELF).ru_maxrss`` at exit: imports, model load and
data preparation included.

How busy the machine was: the cores other work kept busy while each side ran (all CPU time of
the machine from /proc/stat minus the side's own), each side's CPU busy (CPU seconds / wall seconds /
threads over the timed steps), and the matmul bound of each round. On a machine shared with
other work, compare sides within one run only: the rounds are interleaved so that drift hits
every side, and the median round of each side is reported.

Run time on 2 cores: ``--quick`` (8 steps, 1 round) 5.5 minutes on a quiet machine (most of it
TRL's side), 17-18 minutes with other work on 1.3-1.6 of the cores; the defaults (12 steps, 2
rounds) are about 3x that.
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

SIDES = {"edgetune": "edge-tune loop", "edgetune-gc": "edge-tune --grad-checkpoint",
         "trl": "TRL SFTTrainer+PEFT (bf16=True)",
         "trl-nogc": "TRL SFTTrainer, no grad ckpt",
         "hf": "HF Trainer+PEFT (fp32)", "hf-bf16": "HF Trainer+PEFT (bf16=True)"}
ALTERNATIVES = ("trl", "hf-bf16", "hf")  # what a user would pick instead, most likely first
MEMORY_TARGET = 0.6  # edge-tune's peak RSS / the lowest of the alternatives'
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
            "tokens_per_second": real / wall, "tokens_per_cpu_second": real / cpu,
            "padding": 1 - real / computed,
            "cpu_busy": cpu / wall / threads,
            "first_loss": losses[0], "final_loss": sum(tail) / len(tail),
            "tokens_per_step": [t for t, _ in tokens[:len(ends)]]}


def run_edgetune(job: dict, grad_checkpoint: bool = False) -> dict:
    from edge_tune.training.backends import cpu
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
                      seed=a["seed"], warmup_steps=a["lr_warmup"], pack=not a["no_pack"],
                      grad_checkpoint=grad_checkpoint)
    with tempfile.TemporaryDirectory() as adapter_dir:
        result = cpu.train({"config": cfg.to_dict(), "hf_dir": job["hf_dir"],
                            "examples": [Example(*e) for e in job["examples"]],
                            "pad_id": job["pad_id"], "physical_cores": job["threads"],
                            "cpu_has_bf16": job["cpu_has_bf16"], "adapter_dir": adapter_dir},
                           emit)
    return {**summarize(ends, tokens, losses, a["warmup"], job["threads"]),
            "precision": result.precision}


def counting(trainer_cls, tokens: list, losses: list):
    """``trainer_cls`` that records (real, computed) tokens and the loss of each micro-batch."""

    class Counting(trainer_cls):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs["attention_mask"]
            tokens.append((int(mask.sum()), mask.numel()))
            loss = super().training_step(model, inputs, num_items_in_batch)
            losses.append(loss)  # a detached tensor: read after training, no extra sync
            return loss

    return Counting


def timer_callback(ends: list):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(stamp())

    return Timer()


def trainer_args(a: dict, out: str, **extra) -> dict:
    """The TrainingArguments both Trainer-based sides share (edge-tune's schedule, no I/O)."""
    return dict(output_dir=out, use_cpu=True, max_steps=a["steps"],
                per_device_train_batch_size=a["batch_size"], learning_rate=a["lr"],
                lr_scheduler_type="cosine", warmup_steps=min(a["lr_warmup"], a["steps"] // 10),
                weight_decay=0.0, max_grad_norm=1.0, seed=a["seed"], report_to=[],
                save_strategy="no", eval_strategy="no", logging_steps=10**6, disable_tqdm=True,
                dataloader_num_workers=0, **extra)


def lora_config(a: dict):
    from peft import LoraConfig

    return LoraConfig(r=a["rank"], lora_alpha=a["alpha"], lora_dropout=0.0,
                      task_type="CAUSAL_LM", target_modules=TARGETS)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_hf(job: dict, bf16: bool) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from edge_tune.training.backends.cpu import collate
    from edge_tune.data.template import Example

    a = job["args"]
    torch.set_num_threads(job["threads"])
    tokens, ends, losses = [], [], []

    def collator(features):  # right-padding to the longest in the batch, labels -100
        ids, labels, mask = collate([Example(*f) for f in features], job["pad_id"])
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    model = AutoModelForCausalLM.from_pretrained(job["hf_dir"], dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(a))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(**trainer_args(a, out, bf16=bf16, remove_unused_columns=False))
        trainer = counting(Trainer, tokens, losses)(
            model=model, args=args, train_dataset=job["examples"], data_collator=collator,
            callbacks=[timer_callback(ends)])
        trainer.train()
    return {**summarize(ends, tokens, [float(x) for x in losses], a["warmup"],
                         job["threads"]),
            "precision": "bf16 autocast" if bf16 else "fp32"}


def run_trl(job: dict, gradient_checkpointing: bool = True) -> dict:
    """TRL's SFTTrainer as its documentation shows it: model path, ``peft_config``, a
    prompt-completion dataset it tokenizes with the model's chat template."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    a = job["args"]
    torch.set_num_threads(job["threads"])
    tokens, ends, losses = [], [], []
    data = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in job["chats"]])
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(**trainer_args(a, out, bf16=True, max_length=a["seq_len"],
                                        packing=False,
                                        gradient_checkpointing=gradient_checkpointing))
        trainer = counting(SFTTrainer, tokens, losses)(
            model=job["hf_dir"], args=args, train_dataset=data, peft_config=lora_config(a),
            callbacks=[timer_callback(ends)])
        trainer.train()
    return {**summarize(ends, tokens, [float(x) for x in losses], a["warmup"],
                         job["threads"]),
            "precision": "bf16 autocast"}


def child(side: str, job_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    if side.startswith("edgetune"):
        result = run_edgetune(job, grad_checkpoint=side == "edgetune-gc")
    elif side.startswith("trl"):
        result = run_trl(job, gradient_checkpointing=side == "trl")
    else:
        result = run_hf(job, bf16=side == "hf-bf16")
    result["peak_rss_gib"] = peak_rss_gib()
    print(MARK + json.dumps(result), flush=True)


def prepare(args) -> dict:
    """The chats (``--examples`` records: the demo data, cycled), tokenized once with
    edge-tune's own template code for edge-tune and HF Trainer; as messages for TRL."""
    from transformers import AutoTokenizer

    from edge_tune import demo, hardware, models
    from edge_tune.data.formats import read_jsonl
    from edge_tune.data.template import encode

    hf_dir = str(models.dequantized_copy(models.default_gguf()))
    tok = AutoTokenizer.from_pretrained(hf_dir)
    records = list(read_jsonl(demo.demo_data()))
    chats = [[dict(m) for m in records[i % len(records)].messages]
             for i in range(args.examples)]
    examples = [encode(tok, m, args.seq_len) for m in chats]
    examples = [(e.input_ids, e.labels) for e in examples if e.n_trained]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    hw = hardware.probe()
    return {"args": vars(args), "hf_dir": hf_dir, "data": str(demo.demo_data()),
            "examples": examples, "chats": chats,
            "pad_id": int(pad or 0), "threads": hw.physical_cores,
            "cpu_has_bf16": hw.has_bf16_cpu, "cpu": hw.cpu_model}


def busy_cores() -> tuple[float, float]:
    """(CPU seconds all processes of the machine have used, CPU seconds of this process's
    finished children): the difference of two readings, over the wall time between them, is
    how many cores other work kept busy meanwhile (/proc/stat, Linux; (0, 0) elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def run_child(argv: list[str]) -> tuple[dict | None, str]:
    """Run this script in a fresh process; (its result with ``others_cores``: the cores other
    work kept busy meanwhile, or None; an error line)."""
    t0, (all0, own0) = time.perf_counter(), busy_cores()
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    wall, (all1, own1) = time.perf_counter() - t0, busy_cores()
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return None, f"exit {proc.returncode}: {tail}"
    others = max(0.0, (all1 - all0) - (own1 - own0)) / wall
    return {**json.loads(lines[-1][len(MARK):]), "others_cores": others}, ""


def measure_bound(job: dict, tokens: int) -> dict | None:
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, os.path.join(here, "matmul_bound.py"), "--json",
                           "--hf-dir", job["hf_dir"], "--tokens", str(tokens),
                           "--threads", str(job["threads"])], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def median(values: list[float]) -> float:
    v = sorted(values)
    return (v[len(v) // 2] + v[(len(v) - 1) // 2]) / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--examples", type=int, default=256, help="chats (the demo data, cycled)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="default: 2 x rank")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-warmup", type=int, default=5, help="LR warm-up steps (edge-tune rule)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--sides", default="edgetune,trl,hf,hf-bf16")
    p.add_argument("--no-pack", action="store_true",
                   help="edge-tune side with length-grouped padded batches instead of packing")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the median "
                   "tok/s of each side is reported (this VM's speed drifts 10-20%%)")
    p.add_argument("--quick", action="store_true", help="8 steps, 1 round")
    p.add_argument("--no-bound", action="store_true", help="skip the matmul bound")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return child(args.side, args.job)
    if args.quick:
        args.steps, args.repeats = 8, 1
    args.alpha = args.alpha or 2.0 * args.rank
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = set(sides) - set(SIDES)
    if unknown or not 0 < args.warmup < args.steps:
        p.error(f"unknown side(s) {sorted(unknown)}" if unknown else "need 0 < --warmup < --steps")

    t_start = time.perf_counter()
    job = prepare(args)
    n = [len(e[0]) for e in job["examples"]]
    # The bound's products have as many rows as a batch has tokens.
    bound_tokens = args.batch_size * round(sum(n) / len(n))
    print(f"CPU: {job['cpu']}; {job['threads']} threads; native bf16: {job['cpu_has_bf16']}; "
          f"load average {os.getloadavg()[0]:.2f} before the run")
    print(f"model: {job['hf_dir']}\ndata: {len(n)} chats, {sum(n) / len(n):.0f} tokens mean, "
          f"{max(n)} max (seq_len {args.seq_len})")
    print(f"steps {args.steps} (first {args.warmup} untimed), batch {args.batch_size}, "
          f"LoRA r={args.rank} alpha={args.alpha:g} on {len(TARGETS)} projections, "
          f"lr {args.lr:g}, seed {args.seed}, {args.repeats} interleaved round(s)\n")

    runs: dict[str, list[dict]] = {side: [] for side in sides}
    bounds: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        job_path = os.path.join(tmp, "job.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        for round_ in range(1, args.repeats + 1):
            if not args.no_bound:
                b = measure_bound(job, bound_tokens)
                if b:
                    bounds.append(b)
                    print(f"round {round_}: bf16 matmul bound {b['gflops']:.0f} GFLOP/s "
                          f"(2048^3: {b['gflops_2048']:.0f})")
                else:
                    print(f"round {round_}: the matmul bound failed")
            for side in sides:  # interleaved, so slow drift of the machine hits every side
                print(f"round {round_}: running {SIDES[side]} ...", end=" ", flush=True)
                t0 = time.perf_counter()
                result, error = run_child([os.path.abspath(__file__), "--side", side,
                                           "--job", job_path])
                if result is None:
                    print(f"FAILED ({error})")
                    continue
                runs[side].append(result)
                print(f"{time.perf_counter() - t0:.0f}s, "
                      f"{result['tokens_per_second']:.0f} tok/s, "
                      f"{result['peak_rss_gib']:.2f} GiB, other work "
                      f"{result['others_cores']:.1f} cores")
    report(runs, bounds, args, time.perf_counter() - t_start)


def report(runs: dict[str, list[dict]], bounds: list[dict], args, seconds: float) -> None:
    results: dict[str, dict] = {}
    for side, rs in runs.items():
        if rs:
            rs = sorted(rs, key=lambda r: r["tokens_per_second"])
            results[side] = {**rs[len(rs) // 2],
                             "peak_rss_gib": max(r["peak_rss_gib"] for r in rs),
                             "others": median([r["others_cores"] for r in rs])}
    ceiling6 = median([b["ceiling_6n"] for b in bounds]) if bounds else None
    ceiling4 = median([b["ceiling_4n"] for b in bounds]) if bounds else None

    print(f"\n{'side':<33}{'precision':>14}{'tok/s':>7}{'tok/CPU-s':>10}{'of 6N|4N bound':>16}"
          f"{'peak RSS':>10}"
          f"{'padding':>8}{'CPU busy':>9}{'others':>7}{'loss first->final':>19}")
    for side, r in results.items():
        tps = r["tokens_per_second"]
        frac = f"{tps / ceiling6:.0%} | {tps / ceiling4:.0%}" if bounds else "-"
        print(f"{SIDES[side]:<33}{r['precision']:>14}{tps:>7.0f}"
              f"{r['tokens_per_cpu_second']:>10.0f}{frac:>16}"
              f"{r['peak_rss_gib']:>7.2f}GiB{r['padding']:>8.0%}{r['cpu_busy']:>9.0%}"
              f"{r['others']:>7.1f}{r['first_loss']:>10.3f} ->{r['final_loss']:>6.3f}")
    if bounds:
        b = sorted(bounds, key=lambda x: x["gflops"])[len(bounds) // 2]
        print(f"bf16 matmul bound (median of {len(bounds)} rounds): {b['gflops']:.0f} GFLOP/s on "
              f"the model's shapes at {b['tokens']} rows (2048^3: {b['gflops_2048']:.0f}); "
              f"N = {b['n_matmul_params'] / 1e6:.1f}M matmul parameters -> "
              f"{ceiling6:.0f} tok/s at 6N FLOPs/token, {ceiling4:.0f} at 4N")
    busy = [r["cpu_busy"] for r in results.values()]
    others = [r["others_cores"] for rs in runs.values() for r in rs]
    if others:
        print(f"machine: other work kept {min(others):.1f}-{max(others):.1f} of its "
              f"{os.cpu_count()} cores busy while the sides ran (median {median(others):.1f}; "
              f"'others' column); sides' CPU busy {min(busy):.0%}-{max(busy):.0%}; "
              f"the run took {seconds / 60:.1f} min")
    if busy and min(busy) < 0.85:
        print("WARNING: a side kept the CPU busy < 85% of the time: other work was probably "
              "running; compare sides within this run only")
    for side, r in results.items():
        print(f"  {side}: {r['timed_tokens']} tokens over {r['timed_steps']} timed steps; "
              f"tokens/step {r['tokens_per_step']}")
    others = [s for s in ALTERNATIVES if s in results]
    for mine in (s for s in ("edgetune", "edgetune-gc") if s in results):
        e = results[mine]
        print()
        for side in others:
            h = results[side]
            print(f"{SIDES[mine]} vs {SIDES[side]}: "
                  f"{e['tokens_per_second'] / h['tokens_per_second']:.2f}x tokens/s, "
                  f"{e['peak_rss_gib'] / h['peak_rss_gib']:.2f}x peak RSS")
        if others:
            best = min(others, key=lambda s: results[s]["peak_rss_gib"])
            limit = MEMORY_TARGET * results[best]["peak_rss_gib"]
            ratio = e["peak_rss_gib"] / results[best]["peak_rss_gib"]
            print(f"memory target: peak RSS <= {MEMORY_TARGET}x the best alternative's "
                  f"({SIDES[best]}, {results[best]['peak_rss_gib']:.2f} GiB) = {limit:.2f} GiB; "
                  f"{SIDES[mine]} {e['peak_rss_gib']:.2f} GiB = {ratio:.2f}x: "
                  + ("MET" if ratio <= MEMORY_TARGET else "MISSED"))

if __name__ == "__main__":
    main()
