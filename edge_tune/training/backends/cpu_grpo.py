"""GRPO on the cpu backend: rollouts sampled by llama.cpp on the run's GGUF base with the
current adapter, the policy update in torch + PEFT.

One step: the adapter (PEFT, in memory) is written as a GGUF LoRA and swapped into the
rollout engine in place of the previous one (the base stays loaded); ``--num-generations``
completions of each of the step's prompts are sampled at once
(:class:`~edge_tune.llama.rollout.Rollouts`), with llama.cpp's log-probability of every
token; the rewards score them (:mod:`edge_tune.training.rewards`); the trainer computes its
own log-probabilities, the reference's (the adapter off) when ``beta`` > 0, and TRL's loss
(:mod:`edge_tune.training.grpo_loss`), each token weighted by the truncated ratio of the
trainer's probability to llama.cpp's (the gap between the two engines: a quantized base,
other kernels), then one optimizer step. ``--batch-size`` counts completions (TRL's
``per_device_train_batch_size``): a step takes ``batch_size x grad_accum / G`` prompts.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edge_tune.events import Log, Metric, Progress
from edge_tune.training.job import TrainJob, WorkerResult


@dataclass
class PromptExample:
    """One prompt as the step uses it: ``ids`` (rendered for generation, the chat template's
    assistant header included), ``messages`` and ``columns`` (what the rewards get)."""

    ids: list[int]
    messages: list[dict]
    columns: dict = field(default_factory=dict)


def prepare_prompts(job: TrainJob, emit) -> tuple[list[PromptExample], int, dict]:
    """Tokenize the job's prompt records (``job.records``) with the model's chat template
    (``add_generation_prompt``); prompts longer than ``seq_len - max_completion_length``
    are dropped and counted. Sets ``job.val_examples`` from ``job.val_records``. Returns
    (examples, pad id, tokenizer info) as :func:`~edge_tune.training.worker.prepare_examples`."""
    from transformers import AutoTokenizer

    from edge_tune.errors import DataError

    cfg = job.config
    tok = AutoTokenizer.from_pretrained(job.hf_dir)
    if job.chat_template:
        tok.chat_template = job.chat_template
    room = cfg.seq_len - cfg.max_completion_length

    def encode(records: list[dict], name: str) -> list[PromptExample]:
        out, long = [], 0
        for r in records:
            ids = list(tok.apply_chat_template(r["messages"], tools=r.get("tools"),
                                               add_generation_prompt=True, tokenize=True,
                                               return_dict=False))
            if len(ids) > room:
                long += 1
                continue
            out.append(PromptExample(ids, r["messages"], r.get("columns") or {}))
        if long:
            emit(Log(f"{name} prompts: dropped {long} longer than --seq-len {cfg.seq_len} minus "
                     f"--max-completion-length {cfg.max_completion_length} tokens", "warning"))
        return out

    examples = encode(job.records or [], "training")
    if not examples:
        raise DataError("no prompt fits: raise --seq-len or lower --max-completion-length")
    job.val_examples = encode(job.val_records or [], "validation")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    info = {"chat_template": tok.chat_template, "stop_tokens": [t for t in {tok.eos_token} if t]}
    return examples, int(pad or 0), info


def stop_ids(tok) -> set[int]:
    """The tokens that end a completion: the tokenizer's and the generation config's EOS."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    return ids


def adapter_gguf(model, base, out: Path) -> Path:
    """The model's current LoRA adapter as a GGUF LoRA file ``out`` (F32), converted against
    the rollout engine's base ``base`` (a BaseInfo)."""
    from edge_tune.converters.formats import peft_to_gguf

    with tempfile.TemporaryDirectory(prefix="edge-tune-grpo-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        peft_to_gguf.convert(Path(tmp), base, out, "f32", {"general.name": "edge-tune GRPO"})
    return out


def batch_tensors(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """(ids, attention mask, prompt width, completion mask) of a micro-batch: prompts
    left-padded to one width, completions right-padded (TRL's layout)."""
    import torch

    width = max(len(p) for p in prompts)
    length = max(1, max(len(c) for c in completions))
    ids = torch.full((len(prompts), width + length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    cmask = torch.zeros((len(prompts), length))
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, width - len(p):width] = torch.tensor(p)
        mask[i, width - len(p):width] = 1
        if c:
            ids[i, width:width + len(c)] = torch.tensor(c)
            mask[i, width:width + len(c)] = 1
            cmask[i, :len(c)] = 1
    return ids, mask, width, cmask


def score_samples(rewards, examples: list[PromptExample], picked: list[int], samples, tok):
    """(completion texts, per-reward scores, weighted totals) of ``samples`` (G per prompt of
    ``picked``)."""
    from edge_tune.training.rewards import score

    texts = [tok.decode(s.ids, skip_special_tokens=True) for s in samples]
    prompts = [examples[picked[s.prompt]].messages for s in samples]
    keys = sorted({k for s in samples for k in examples[picked[s.prompt]].columns})
    columns = {k: [examples[picked[s.prompt]].columns.get(k) for s in samples] for k in keys}
    per, total = score(rewards, prompts, texts, columns)
    return texts, per, total


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / max(1, len(vals) - 1))
    return m, sd


def frac_zero_std(total: list[float], G: int) -> float:
    """The share (0-1) of groups (``G`` consecutive completions of one prompt) whose weighted
    rewards are all equal (TRL's ``frac_reward_zero_std``): their advantages are zero, so
    they teach nothing. Pure."""
    groups = [total[k:k + G] for k in range(0, len(total), G)]
    flat = sum(1 for g in groups if max(g) - min(g) <= 1e-9 * max(1.0, abs(max(g))))
    return flat / max(1, len(groups))


def step_stats(rewards, per, total, samples, parts: list, G: int = 1) -> dict:
    """The step's Metric ``rl`` fields: reward mean/std (weighted total), each reward's,
    the share of groups of ``G`` with all rewards equal, mean completion length in tokens,
    and the micro-batches' ``parts`` ((tokens, kl, clip ratio, is mean, is max) each)
    averaged by tokens."""
    out = {}
    out["reward"], out["reward_std"] = _mean_std(total)
    out["frac_reward_zero_std"] = frac_zero_std(total, G)
    for r, p in zip(rewards, per):
        out[f"reward/{r.name}"], out[f"reward/{r.name}/std"] = _mean_std(p)
    out["completion_length"] = sum(len(s.ids) for s in samples) / max(1, len(samples))
    n = sum(t for t, *_ in parts) or 1
    out["kl"] = sum(t * k for t, k, *_ in parts) / n
    out["clip_ratio"] = sum(t * c for t, _, c, *_ in parts) / n
    out["is_ratio_mean"] = sum(t * m for t, _, _, m, _ in parts) / n
    out["is_ratio_max"] = max((x for *_, x in parts), default=1.0)
    return {k: round(v, 6) for k, v in out.items()}


def _prompt_order(n: int, per_step: int, steps: int, seed: int) -> list[list[int]]:
    """Each step's prompt indices: seeded shuffles of all prompts, one after another."""
    rng = random.Random(seed)
    flat: list[int] = []
    while len(flat) < per_step * steps:
        order = list(range(n))
        rng.shuffle(order)
        flat += order
    return [flat[k * per_step:(k + 1) * per_step] for k in range(steps)]


def train_grpo(job: TrainJob, emit: Callable) -> WorkerResult:
    """GRPO (see the module) for ``job.config.max_steps`` steps, or ``epochs`` passes over
    the prompts; saves the PEFT adapter in ``job.adapter_dir``. Reads of ``job``: config,
    hf_dir, model_ref (its GGUF samples the rollouts), examples (:class:`PromptExample`),
    pad_id, physical_cores, cpu_has_bf16, run_dir, interrupt."""
    import torch
    from transformers import AutoTokenizer

    from edge_tune.llama.rollout import Rollouts
    from edge_tune.training import checkpoint
    from edge_tune.training.backends.cpu import build_model, use_bf16
    from edge_tune.training.loop import final_loss, lr_at, torch_optimizer, warmup_for
    from edge_tune.training.rewards import check_columns, parse_rewards

    cfg = job.config
    G = cfg.num_generations
    threads = cfg.threads or max(1, job.physical_cores)
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    bf16 = use_bf16(cfg.precision, job.cpu_has_bf16)
    rewards = parse_rewards(cfg.reward, [float(w) for w in cfg.reward_weights])
    examples: list[PromptExample] = job.examples
    check_columns(rewards, {k for e in examples for k in e.columns})
    if job.model_ref is None or job.model_ref.gguf is None:
        from edge_tune.errors import UsageError

        raise UsageError("--method grpo samples with llama.cpp: --model must be a GGUF (or "
                         "'default')", setting="model")
    per_step = max(1, cfg.batch_size * cfg.grad_accum // G)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(examples) / per_step))
    warmup = warmup_for(cfg, total)
    order = _prompt_order(len(examples), per_step, total, cfg.seed)

    emit(Progress("load", 0, None, "", "loading base model"))
    t0 = time.perf_counter()
    model = build_model(Path(job.hf_dir), cfg, bf16)
    tok = AutoTokenizer.from_pretrained(job.hf_dir)
    stops = stop_ids(tok)
    longest = max(len(e.ids) for e in examples)
    roll = Rollouts(Path(job.model_ref.gguf), n_ctx=longest + cfg.max_completion_length + 8,
                    parallel=per_step * G, threads=cfg.threads or None, seed=cfg.seed)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    emit(Log(f"GRPO: {len(examples)} prompts, {per_step} per step x {G} completions (llama.cpp "
             f"on {Path(job.model_ref.gguf).name}), rewards {', '.join(r.name for r in rewards)};"
             f" loss {cfg.loss_type}, beta {cfg.beta:g} (reference = the base, adapter off), "
             f"epsilon {cfg.epsilon:g}, IS cap {cfg.is_cap:g}; {n_train / 1e6:.2f}M LoRA "
             f"parameters, loaded in {time.perf_counter() - t0:.1f}s"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch_optimizer(cfg, params)
    model.train()
    stop = job.interrupt or checkpoint.Interrupt()
    losses: list[float] = []
    tokens = 0
    rollout_seconds = 0.0
    flat_steps = 0  # steps where every group's rewards were equal: a zero update
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edge-tune-grpo-") as tmp, roll:
        for step in range(total):
            lr = lr_at(step, total, cfg.lr, warmup, schedule=cfg.lr_scheduler)
            for g in opt.param_groups:
                g["lr"] = lr
            t_roll = time.perf_counter()
            # step 0: PEFT's B matrices are zero, the adapter is the base itself
            roll.use_adapter(None if step == 0 else
                             adapter_gguf(model, roll.base, Path(tmp) / f"a{step % 2}.gguf"))
            picked = order[step]
            samples = roll.sample([examples[i].ids for i in picked], G,
                                  cfg.max_completion_length, cfg.temperature, stops)
            rollout_seconds += time.perf_counter() - t_roll
            texts, per, total_r = score_samples(rewards, examples, picked, samples, tok)
            loss, parts = _update(model, opt, params, cfg, examples, picked, samples, total_r,
                                  job.pad_id, bf16, stop)
            losses.append(loss)
            tokens += sum(len(s.ids) for s in samples)
            elapsed = time.perf_counter() - start
            emit(Metric(step=step + 1, total_steps=total, loss=loss,
                        tokens_per_second=tokens / elapsed,
                        eta_seconds=elapsed / (step + 1) * (total - step - 1), learning_rate=lr,
                        epoch=(step + 1) * per_step / len(examples),
                        rl={**step_stats(rewards, per, total_r, samples, parts, G),
                            "rollout_tokens_per_second": round(
                                tokens / max(rollout_seconds, 1e-9), 2)}))
            if step == 0 or (step + 1) % max(1, total // 5) == 0:
                emit(Log(f"step {step + 1} sample: {texts[0][:160]!r}", "debug"))
            if frac_zero_std(total_r, G) == 1.0:
                flat_steps += 1
                emit(Log(f"step {step + 1}: no learning signal: for each of its {per_step} "
                         f"prompts all {G} completions got the same reward, so the rewards "
                         "move nothing", "warning"))
    if flat_steps * 2 > total:
        emit(Log(f"GRPO learnt nothing in {flat_steps} of {total} steps: every completion of a "
                 "prompt got the same reward. Check the rewards on a few completions "
                 "(`edge-tune eval`), raise --num-generations or --temperature, or give "
                 "partial credit", "warning"))
    model.save_pretrained(str(job.adapter_dir), safe_serialization=True)
    seconds = time.perf_counter() - start
    return WorkerResult(steps=total, final_loss=final_loss(losses), val_loss=None,
                        tokens=tokens, tokens_per_second=tokens / seconds,
                        train_seconds=seconds, precision="bf16" if bf16 else "fp32",
                        trainable_parameters=n_train, losses=[round(x, 6) for x in losses],
                        examples=len(examples))


def _update(model, opt, params, cfg, examples, picked, samples, rewards_total, pad_id, bf16,
            stop) -> tuple[float, list]:
    """Advantages of the step's rollouts, then the loss over micro-batches of
    ``cfg.batch_size`` completions, backward, and one optimizer step. Returns (loss, the
    micro-batches' (tokens, kl, clip ratio, IS mean, IS max))."""
    import torch

    from edge_tune.training.backends.cpu import compute_precision
    from edge_tune.training.grpo_loss import (completion_logps, grpo_loss, group_advantages,
                                              truncated_is_ratio)

    adv, _ = group_advantages(torch.tensor(rewards_total, dtype=torch.float32),
                              cfg.num_generations)
    num_items = float(sum(len(s.ids) for s in samples))
    micro = [list(range(k, min(k + cfg.batch_size, len(samples))))
             for k in range(0, len(samples), cfg.batch_size)]
    loss_total, parts = 0.0, []
    for rows in micro:
        ids, mask, width, cmask = batch_tensors([examples[picked[samples[i].prompt]].ids
                                                 for i in rows],
                                                [samples[i].ids for i in rows], pad_id)
        sampling = torch.zeros_like(cmask)
        for j, i in enumerate(rows):
            sampling[j, :len(samples[i].logps)] = torch.tensor(samples[i].logps)
        ref = None
        with compute_precision(model, bf16):
            if cfg.beta:
                with torch.no_grad(), model.disable_adapter():
                    ref = completion_logps(model, ids, mask, width, cfg.temperature).float()
            logps = completion_logps(model, ids, mask, width, cfg.temperature).float()
        ratio = torch.exp((logps.detach() - sampling) * cmask)
        is_ratio = truncated_is_ratio(logps.detach(), sampling, cmask, cfg.is_cap)
        out = grpo_loss(logps, None, ref, cmask, adv[rows], loss_type=cfg.loss_type,
                        epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon, beta=cfg.beta,
                        is_ratio=is_ratio, max_completion_length=cfg.max_completion_length,
                        num_items=num_items, grad_accum=len(micro))
        out.loss.backward()
        loss_total += float(out.loss.detach())
        real = cmask.bool()
        parts.append((out.tokens, out.kl, out.clip_ratio,
                      float(ratio[real].mean()) if real.any() else 1.0,
                      float(ratio[real].max()) if real.any() else 1.0))
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    with stop.guard():
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss_total, parts
