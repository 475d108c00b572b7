"""LoRA training on the CPU with torch + PEFT: a plain loop, tuned for small models.

Why not ``transformers.Trainer``: on a CPU a few choices matter more than anything else, and a
plain loop makes them easy (``benchmarks/train_throughput.py`` measures the gain):

* frozen base weights are stored in bf16 and every matmul runs under bf16 autocast where the
  CPU does bf16 natively (AVX512-BF16 / AMX): half the memory and ~1.5-3x the speed; the LoRA
  weights and the optimizer stay fp32;
* logits are computed only at positions that carry a loss: about half of chat tokens are
  prompt, and the vocabulary projection (49k words) is a large share of the forward pass;
* batches are grouped by length, so almost no padding is computed;
* eager attention, and no fp32 round trip of activations into the LoRA layers under autocast.

Runs inside the training subprocess (``edge_tune.backends.worker``); talks only through ``emit``.
"""

from __future__ import annotations

import math
import random
import signal
import time
from pathlib import Path
from typing import Callable

from edge_tune.backends import attention, checkpoint
from edge_tune.data import sharding
from edge_tune.data.template import IGNORE, Example
from edge_tune.errors import EdgeTuneError
from edge_tune.events import Log, Metric, Progress


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random,
                           window: int = 64) -> list[list[int]]:
    """Shuffle, then sort by length inside windows of ``window`` batches: little padding,
    still random order. Pure."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * window
    batches = []
    for i in range(0, len(order), span):
        chunk = sorted(order[i:i + span], key=lambda j: lengths[j])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak. ``step`` is 0-based. Pure."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def collate(examples: list[Example], pad_id: int, multiple: int = 1):
    """(ids, labels, attention mask), right-padded to the longest example rounded up to
    ``multiple``; padding carries no loss."""
    import torch

    width = multiple * math.ceil(max(len(e.input_ids) for e in examples) / multiple)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return ids, labels, mask


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into as few rows of at most ``capacity`` tokens as first-fit
    decreasing finds, then spread the examples evenly over those rows (longest first, each into
    the emptiest row) when that still fits: a batch is as wide as its fullest row, so even rows
    mean less padding and shorter attention. An example longer than ``capacity`` gets a row of
    its own. Pure."""
    rows: list[list[int]] = []
    room: list[int] = []
    by_length = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    for i in by_length:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    even: list[list[int]] = [[] for _ in rows]
    fill = [0] * len(rows)
    for i in by_length:
        r = min(range(len(fill)), key=fill.__getitem__)
        even[r].append(i)
        fill[r] += lengths[i]
    fits = all(f <= capacity or len(row) == 1 for f, row in zip(fill, even))
    if fits and max(fill) < capacity - min(room):
        return even
    return rows


def collate_packed(examples: list[Example], pad_id: int, capacity: int):
    """Pack a batch into as few rows as fit ``capacity`` tokens, attention kept inside each
    example: a block-diagonal causal mask and positions restarting at 0 per example. Returns
    (ids, labels, 4-D additive mask, position_ids, real token count)."""
    import torch

    rows = pack_rows([len(e.input_ids) for e in examples], capacity)
    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row):
            e, n = examples[i], len(examples[i].input_ids)
            ids[r, at:at + n] = torch.tensor(e.input_ids)
            labels[r, at:at + n] = torch.tensor(e.labels)
            labels[r, at] = IGNORE  # nothing predicts an example's first token from the last one
            positions[r, at:at + n] = torch.arange(n)
            segment[r, at:at + n] = seg
            at += n
    same = segment[:, :, None] == segment[:, None, :]
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    allowed = (same & causal) | torch.eye(width, dtype=torch.bool)  # pads see only themselves
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(
        ~allowed, torch.finfo(torch.float32).min)[:, None]
    return ids, labels, mask, positions, int((segment >= 0).sum())


def use_bf16(precision: str, cpu_has_bf16: bool) -> bool:
    return precision == "bf16" or (precision == "auto" and cpu_has_bf16)


def build_model(hf_dir: Path, cfg: dict, bf16: bool):
    """The base model with LoRA layers: frozen base in bf16 (or fp32), trainable LoRA in fp32."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = AutoConfig.from_pretrained(str(hf_dir)).model_type
    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.bfloat16 if bf16 else torch.float32,
        # Eager attention: on CPU, SDPA's flash-attention backward is ~30% of a training
        # step on short chat sequences; plain matmuls are faster here. edge-tune's variant
        # keeps one copy of the probabilities instead of two (attention.py).
        attn_implementation=attention.implementation(model_type))
    model.config.use_cache = False
    if cfg.get("grad_checkpoint"):
        # Keep only each block's input; recompute the block in backward (non-reentrant, so the
        # frozen embeddings need no requires_grad trick).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], lora_dropout=0.0,
                      target_modules=cfg["target_modules"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


LOSS_CHUNK = 128  # positions per slice of the vocabulary projection


def _chunk_loss_sum(head, hidden, targets, cap):
    import torch.nn.functional as F

    logits = head(hidden)
    if cap:
        logits = (logits / cap).tanh() * cap
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def response_loss(model, ids, labels, mask, position_ids=None):
    """Mean cross-entropy over trained positions only.

    Hidden states are computed for all tokens, logits only where the next token carries a
    loss, and only ``LOSS_CHUNK`` positions at a time: each slice's logits are recomputed in
    backward instead of kept (a 49k-word vocabulary makes them the largest tensors of a step).
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    causal_lm = model.get_base_model()
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = decoder(input_ids=ids, attention_mask=mask,
                     position_ids=position_ids).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    hidden, targets = hidden[:, :-1][keep], targets[keep]
    head = causal_lm.get_output_embeddings()
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, len(targets), LOSS_CHUNK):
        total = total + checkpoint(_chunk_loss_sum, head, hidden[i:i + LOSS_CHUNK],
                                   targets[i:i + LOSS_CHUNK], cap, use_reentrant=False)
    return total / max(1, len(targets))


def compute_precision(model, bf16: bool):
    """bf16 autocast where the CPU has it, without PEFT's fp32 round trip of activations
    into the LoRA layers (the LoRA weights stay fp32 for the optimizer)."""
    import contextlib

    import torch
    from peft.helpers import disable_input_dtype_casting

    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16))
    stack.enter_context(disable_input_dtype_casting(model, active=bf16))
    return stack


def evaluate(model, examples: list[Example], batch_size: int, pad_id: int, bf16: bool) -> float:
    """Mean loss per trained token over ``examples`` (no gradients)."""
    import torch

    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad(), compute_precision(model, bf16):
        for k in range(0, len(order), batch_size):
            ids, labels, mask = collate([examples[i] for i in order[k:k + batch_size]], pad_id)
            n = int((labels[:, 1:] != IGNORE).sum())
            total += response_loss(model, ids, labels, mask).item() * n
            count += n
    model.train()
    return total / max(1, count)


def eval_steps(total: int, every: int) -> set[int]:
    """1-based steps after which validation runs: every ``every`` steps (0 = ~5 times), and
    always after the last step. Pure."""
    every = every or max(1, math.ceil(total / 5))
    return set(range(every, total + 1, every)) | {total}


class Distributed:
    """This process's place under torchrun (one process: rank 0 of 1, nothing to sync).

    LoRA gradients are few and small, so each step sums them across ranks with one
    ``all_reduce`` per tensor and divides by the world size: the exact mean gradient of the
    global batch (DDP's bucketing buys nothing here), applied before clipping on every rank,
    so all ranks take the same update and keep the same weights."""

    def __init__(self) -> None:
        import os

        import torch.distributed as td

        on = td.is_available() and td.is_initialized()
        self.world = td.get_world_size() if on else 1
        self.rank = td.get_rank() if on else 0
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if on else 1

    def sum_int(self, value: int) -> int:
        """``value`` summed over all ranks."""
        if self.world == 1:
            return value
        import torch
        import torch.distributed as td

        total = torch.tensor([value], dtype=torch.int64)
        td.all_reduce(total, op=td.ReduceOp.SUM)
        return int(total[0])

    def average_grads(self, params, loss: float, tokens: int) -> tuple[float, int]:
        """Mean gradients and loss, summed tokens over all ranks."""
        if self.world == 1:
            return loss, tokens
        import torch
        import torch.distributed as td

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            td.all_reduce(p.grad, op=td.ReduceOp.SUM)
            p.grad.div_(self.world)
        totals = torch.tensor([loss, float(tokens)], dtype=torch.float64)
        td.all_reduce(totals, op=td.ReduceOp.SUM)
        return float(totals[0]) / self.world, int(totals[1])


def slot_orders(job: dict, accum: int, dist: "Distributed") -> list[Callable[[int], list[int]]]:
    """For each micro-batch of a step this rank computes (its slots, see
    :mod:`edge_tune.data.sharding`): step -> positions in ``job["examples"]`` (this rank's
    shard; ``job["example_index"]`` holds their record indices)."""
    examples = job["examples"]
    cfg = job["config"]
    slots = accum * dist.world
    index = job.get("example_index") or list(range(len(examples)))
    orders = []
    for slot in sharding.rank_slots(dist.rank, accum):
        members = [k for k, i in enumerate(index) if sharding.slot_of(i, slots) == slot]
        if not members:
            raise EdgeTuneError(f"too few training examples for {slots} micro-batches per step "
                                f"(slot {slot} is empty): lower --grad-accum or --nproc")
        order = sharding.SlotOrder([len(examples[k].input_ids) for k in members],
                                   cfg["batch_size"], cfg["seed"], slot, length_grouped_batches)
        orders.append(lambda step, m=members, o=order: [m[k] for k in o.batch(step)])
    return orders


def train(job: dict, emit: Callable) -> dict:
    """Train a LoRA adapter; save it in PEFT format to ``job["adapter_dir"]``.

    ``job``: config (dict), hf_dir, examples (tokenized), pad_id, physical_cores, cpu_has_bf16.
    """
    import torch

    cfg = job["config"]
    dist = Distributed()
    # Ranks on one node share its cores: torch's default (all cores each) oversubscribes.
    threads = cfg["threads"] or max(1, job["physical_cores"] // dist.local_world)
    torch.set_num_threads(threads)
    torch.manual_seed(cfg["seed"])
    bf16 = use_bf16(cfg["precision"], job["cpu_has_bf16"])

    emit(Progress("load", 0, None, "", "loading base model"))
    t0 = time.perf_counter()
    model = build_model(Path(job["hf_dir"]), cfg, bf16)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    emit(Log(f"model loaded in {time.perf_counter() - t0:.1f}s; {n_train / 1e6:.2f}M trainable "
             f"LoRA parameters; {'bf16' if bf16 else 'fp32'} compute on {threads} threads"))

    examples: list[Example] = job["examples"]
    accum = max(1, cfg.get("grad_accum") or 1)  # micro-batches per optimizer step, per rank
    # A step takes one micro-batch from each of accum x world slots; this rank holds the
    # examples of its own slots only (its shard), each slot with an order that depends on
    # (seed, slot, step) alone: the global batch of one process's run, whatever the world.
    slots = accum * dist.world
    orders = slot_orders(job, accum, dist)
    n_examples = dist.sum_int(len(examples))
    steps_per_epoch = sharding.steps_per_epoch(n_examples, cfg["batch_size"], slots)
    total = cfg["max_steps"] or max(1, round(cfg["epochs"] * steps_per_epoch))

    val_examples: list[Example] = job.get("val_examples") or []
    evals = eval_steps(total, cfg.get("eval_every", 0)) if val_examples else set()
    val_loss = None

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    model.train()
    tokens_done, losses, start, first = 0, [], time.perf_counter(), 0
    if job.get("resume_from"):
        state = checkpoint.restore(Path(job["resume_from"]), model, opt)
        if (state["total"], state.get("slots")) != (total, slots):
            raise EdgeTuneError(f"{job['resume_from']}: the checkpoint is for {state['total']} "
                                f"steps of {state.get('slots')} micro-batches, this run has "
                                f"{total} of {slots}; the data or config changed")
        first, tokens_done, losses = state["step"], state["tokens"], state["losses"]
        val_loss = state.get("val_loss")
        start -= state["train_seconds"]
        emit(Log(f"resumed from the checkpoint at step {first}/{total}"))
    stop = job.get("interrupt") or checkpoint.Interrupt()  # installed by the worker
    save_every = cfg.get("save_every") or 0

    def save_checkpoint(done: int) -> None:
        # The data order and the LR schedule are pure functions of the step.
        checkpoint.save(Path(job["run_dir"]), model, opt, {
            "step": done, "total": total, "slots": slots, "tokens": tokens_done,
            "losses": losses, "val_loss": val_loss,
            "train_seconds": time.perf_counter() - start})

    done = first
    try:
        for step in range(first, total):
            lr = lr_at(step, total, cfg["lr"], min(cfg["warmup_steps"], total // 10))
            for g in opt.param_groups:
                g["lr"] = lr
            step_loss, n_tokens = 0.0, 0
            for batch_at in orders:
                batch = [examples[k] for k in batch_at(step)]
                if cfg.get("pack"):
                    # Rows no wider than the batch's longest example: packing then only joins
                    # examples that fit beside each other, and never widens the attention
                    # (quadratic in the row) beyond what padding would compute.
                    ids, labels, mask, positions, n_micro = collate_packed(
                        batch, job["pad_id"], max(len(e.input_ids) for e in batch))
                else:
                    (ids, labels, mask), positions = collate(batch, job["pad_id"]), None
                    n_micro = int(mask.sum())
                with compute_precision(model, bf16):
                    loss = response_loss(model, ids, labels, mask, positions) / accum
                loss.backward()
                step_loss += loss.item()
                n_tokens += n_micro
            step_loss, n_tokens = dist.average_grads(params, step_loss, n_tokens)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            with stop.guard():  # SIGTERM waits for the update to complete
                opt.step()
                opt.zero_grad(set_to_none=True)
                tokens_done += n_tokens
                losses.append(step_loss)
                done = step + 1

            elapsed = time.perf_counter() - start
            if dist.rank == 0:  # rank 0 reports for all (its token counts are the global ones)
                emit(Metric(step=step + 1, total_steps=total, loss=losses[-1],
                            tokens_per_second=tokens_done / elapsed,
                            eta_seconds=elapsed / (step + 1) * (total - step - 1),
                            learning_rate=lr, epoch=(step + 1) / steps_per_epoch))
            if step + 1 in evals and dist.rank == 0:  # the others go on to the next step's sync
                t_eval = time.perf_counter()
                val_loss = evaluate(model, val_examples, cfg["batch_size"], job["pad_id"], bf16)
                start += time.perf_counter() - t_eval  # tok/s counts training time only
                emit(Metric(step=step + 1, total_steps=total, loss=val_loss, split="val",
                            epoch=(step + 1) / steps_per_epoch))
            if save_every and (step + 1) % save_every == 0 and step + 1 < total \
                    and dist.rank == 0:
                with stop.guard():
                    save_checkpoint(step + 1)
    except BaseException as exc:
        # SIGTERM (or Ctrl-C) may surface wrapped by a library; either way the weights are
        # those after step ``done``: the update is guarded and forward/backward change none.
        if not (stop.requested or isinstance(exc, KeyboardInterrupt)):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the save
        if dist.rank != 0:  # rank 0 writes the run directory (all ranks hold the same weights)
            raise checkpoint.Cancelled() from None
        save_checkpoint(done)
        emit(Log(f"checkpoint saved at step {done}/{total}; resume with "
                 f"`edge-tune train --resume {job['run_dir']}`"))
        raise checkpoint.Cancelled() from None

    out = Path(job["adapter_dir"])
    if dist.rank == 0:
        model.save_pretrained(str(out), safe_serialization=True)
    tail = losses[-max(1, min(10, len(losses) // 5)):]
    return {
        "steps": total,
        "final_loss": sum(tail) / len(tail),
        "val_loss": val_loss,
        "tokens": tokens_done,
        "tokens_per_second": tokens_done / (time.perf_counter() - start),
        "train_seconds": time.perf_counter() - start,
        "precision": "bf16" if bf16 else "fp32",
        "trainable_parameters": n_train,
        "losses": [round(x, 6) for x in losses],  # per optimizer step (the loss curve)
        "world_size": dist.world,
        "examples": n_examples,  # over all ranks' shards
    }
