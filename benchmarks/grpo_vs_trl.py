"""GRPO on the CPU: edge-tune (llama.cpp rollouts on the GGUF, torch + PEFT update) against
TRL's ``GRPOTrainer`` on its default generation path (``transformers.generate``, no vLLM).

Same model (the default SmolLM2-135M: its GGUF for edge-tune's rollouts, its dequantized HF
copy for both trainers), same prompts, G completions per prompt, completion length, sampling
temperature, LoRA (r 16, alpha 32, the seven projections), beta 0.04 (KL to the adapter-off
base) and loss type dapo. Each side runs in its own process, one round of ``--steps`` steps
at a time, the sides alternating for ``--rounds`` rounds (the machine's speed drifts); model
loading is left out. Reported per side: median seconds per step, and rollout tokens/s (the
tokens generated / the seconds generating them: edge-tune's ``Rollouts.sample`` with the
adapter swap, TRL's ``_generate_single_turn``). Precision is each tool's own CPU default:
edge-tune bf16 autocast where the CPU has it, TRL fp32.

    python benchmarks/grpo_vs_trl.py [--steps 3] [--rounds 2] [--generations 8]
        [--prompts-per-step 2] [--completion 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "benchmarks" / "data" / "grpo_arith" / "train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def reward_numeric(prompts, completions, answer, **kw):
    """The benchmark's reward (TRL's signature): the last number equals the answer."""
    from edge_tune.training.rewards import completion_text, last_number

    out = []
    for c, a in zip(completions, answer):
        got = last_number(completion_text(c))
        out.append(1.0 if got is not None and abs(got - float(a)) < 1e-6 else 0.0)
    return out


def _prompts(n: int) -> list[dict]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:n]]
    return [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
            for r in rows]


def run_edge(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    from edge_tune import models
    from edge_tune.config import TrainConfig
    from edge_tune.hardware import probe
    from edge_tune.llama.rollout import Rollouts
    from edge_tune.training.backends import cpu_grpo as cg
    from edge_tune.training.backends.cpu import build_model, use_bf16
    from edge_tune.training.checkpoint import Interrupt
    from edge_tune.training.rewards import Reward

    gguf = models.default_gguf()
    hf = models.dequantized_copy(gguf)
    G, per = args.generations, args.prompts_per_step
    cfg = TrainConfig(data="x", method="grpo", reward=["numeric:answer"], num_generations=G,
                      batch_size=G * per, beta=0.04, loss_type="dapo", lr=1e-4,
                      max_completion_length=args.completion, temperature=args.temperature,
                      target_modules=TARGETS)
    torch.manual_seed(0)
    bf16 = use_bf16("auto", probe().has_bf16_cpu)
    model = build_model(hf, cfg, bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    tok = AutoTokenizer.from_pretrained(hf)
    rows = _prompts(per * args.steps)
    examples = [cg.PromptExample(list(tok.apply_chat_template(
        r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)),
        r["prompt"], {"answer": r["answer"]}) for r in rows]
    rewards = [Reward("numeric", reward_numeric)]
    step_s, gen_s, gen_tokens = [], 0.0, 0
    with Rollouts(gguf, n_ctx=max(len(e.ids) for e in examples) + args.completion + 8,
                  parallel=per * G, seed=0) as roll:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for step in range(args.steps):
                picked = list(range(step * per, (step + 1) * per))
                t0 = time.perf_counter()
                roll.use_adapter(None if step == 0 else
                                 cg.adapter_gguf(model, roll.base, Path(tmp) / "a.gguf"))
                samples = roll.sample([examples[i].ids for i in picked], G, args.completion,
                                      args.temperature, {tok.eos_token_id})
                t1 = time.perf_counter()
                _, per_r, total = cg.score_samples(rewards, examples, picked, samples, tok)
                cg._update(model, opt, params, cfg, examples, picked, samples, total,
                           tok.eos_token_id, bf16, Interrupt())
                step_s.append(time.perf_counter() - t0)
                gen_s += t1 - t0
                gen_tokens += sum(len(s.ids) for s in samples)
    return {"step_seconds": step_s, "gen_tokens": gen_tokens, "gen_seconds": gen_s,
            "precision": "bf16" if bf16 else "fp32"}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from edge_tune import models

    hf = models.dequantized_copy(models.default_gguf())
    G, per = args.generations, args.prompts_per_step
    timing = {"gen": 0.0, "tokens": 0, "steps": []}

    class Timed(GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, *a, **k):
            t = time.perf_counter()
            out = super()._generate_single_turn(prompt_ids, *a, **k)
            timing["gen"] += time.perf_counter() - t
            timing["tokens"] += sum(len(c) for c in out[0])  # completion ids
            return out

    class Steps(TrainerCallback):
        def on_step_begin(self, *a, **k):
            timing["t"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            timing["steps"].append(time.perf_counter() - timing["t"])

    torch.manual_seed(0)
    conf = GRPOConfig(output_dir="/tmp/grpo_vs_trl", per_device_train_batch_size=G * per,
                      num_generations=G, max_completion_length=args.completion,
                      temperature=args.temperature, beta=0.04, loss_type="dapo",
                      learning_rate=1e-4, max_steps=args.steps, logging_steps=1,
                      report_to=[], use_cpu=True, save_strategy="no", seed=0,
                      dataloader_num_workers=0)
    trainer = Timed(model=AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32),
                    processing_class=AutoTokenizer.from_pretrained(hf),
                    reward_funcs=[reward_numeric], args=conf,
                    train_dataset=Dataset.from_list(_prompts(per * args.steps)),
                    peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                           task_type="CAUSAL_LM"),
                    callbacks=[Steps()])
    trainer.train()
    return {"step_seconds": timing["steps"], "gen_tokens": timing["tokens"],
            "gen_seconds": timing["gen"], "precision": "fp32"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--completion", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--side", choices=["edge", "trl"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print("RESULT " + json.dumps((run_edge if args.side == "edge" else run_trl)(args)))
        return
    got: dict[str, list] = {"edge": [], "trl": []}
    for r in range(args.rounds):
        for side in ("edge", "trl"):
            cmd = [sys.executable, __file__, "--side", side] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k not in ("side", "rounds")]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
            got[side].append(json.loads(line[0][7:]))
            print(f"round {r + 1} {side}: {got[side][-1]['step_seconds']}", flush=True)
    table = {}
    for side, runs in got.items():
        steps = [s for run in runs for s in run["step_seconds"][1:]]  # step 1 warms up
        tokens = sum(run["gen_tokens"] for run in runs)
        seconds = sum(run["gen_seconds"] for run in runs)
        table[side] = {"median_step_seconds": round(statistics.median(steps), 2),
                       "rollout_tokens_per_second": round(tokens / seconds, 1),
                       "precision": runs[0]["precision"], "steps_timed": len(steps)}
    table["speedup_per_step"] = round(table["trl"]["median_step_seconds"]
                                      / table["edge"]["median_step_seconds"], 2)
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
