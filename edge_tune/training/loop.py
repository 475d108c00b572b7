"""The pieces every backend's training loop shares, so that a setting means the same on each:
the step count, the learning-rate schedule, the length-grouped data order, validation steps,
and gradient averaging across torchrun ranks.

Pure except :class:`Distributed` (torch, imported inside). The schedule is written once for
Python floats and for traced array code (mlx, whose optimizer evaluates it inside a compiled
step).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, Callable

from edge_tune.training.job import TrainJob, as_config
from edge_tune.config import TrainConfig
from edge_tune.data import sharding
from edge_tune.errors import DataError

# --- how long a run is ---------------------------------------------------------------------------


def grad_accum(cfg: TrainConfig | Mapping) -> int:
    """Micro-batches per optimizer step (per rank)."""
    return max(1, as_config(cfg).grad_accum or 1)


def step_counts(cfg: TrainConfig | Mapping, n_examples: int,
                world: int = 1) -> tuple[int, int, int]:
    """(total optimizer steps, steps per epoch, warm-up steps) for ``n_examples`` over all
    ranks: ``max_steps`` wins over ``epochs``; warm-up: :func:`warmup_for`. Pure."""
    cfg = as_config(cfg)
    per_epoch = sharding.steps_per_epoch(n_examples, cfg.batch_size, grad_accum(cfg) * world)
    total = cfg.max_steps or max(1, round(cfg.epochs * per_epoch))
    return total, per_epoch, warmup_for(cfg, total)


def warmup_for(cfg: TrainConfig | Mapping, total: int) -> int:
    """Warm-up steps of a ``total``-step run: ``warmup_ratio`` of it rounded up (TRL's
    rule) when given, else ``warmup_steps`` capped at a tenth of the run. Pure."""
    cfg = as_config(cfg)
    if cfg.warmup_ratio:
        return min(total, math.ceil(cfg.warmup_ratio * total))
    return min(cfg.warmup_steps, total // 10)


def eval_steps(total: int, every: int) -> set[int]:
    """1-based steps after which validation runs: every ``every`` steps (0 = ~5 times), and
    always after the last step. Pure."""
    every = every or max(1, math.ceil(total / 5))
    return set(range(every, total + 1, every)) | {total}


# --- the learning-rate schedule --------------------------------------------------------------

PYTHON_OPS = SimpleNamespace(minimum=min, maximum=max, cos=math.cos,
                             where=lambda cond, a, b: a if cond else b)


def lr_at(step: Any, total: int, peak: float, warmup: int, ops: Any = PYTHON_OPS,
          schedule: str = "cosine") -> Any:
    """The learning rate of 0-based ``step``: linear warm-up over ``warmup`` steps, then
    ``schedule`` (``--lr-scheduler``): cosine or linear decay to 10% of the peak at the last
    step, or constant at the peak. ``step``: a Python number (the default ``ops``), or a float
    array with ``ops`` its module (e.g. ``mlx.core``: ``minimum``, ``maximum``, ``cos``,
    ``where``). Every backend calls this one function. Pure."""
    warm = peak * (step + 1) / warmup if warmup else peak
    progress = ops.minimum(1.0, ops.maximum(step - warmup, 0.0) / max(1, total - warmup))
    if schedule == "constant":
        after = progress * 0.0 + peak
    elif schedule == "linear":
        after = peak * (1.0 - 0.9 * progress)
    elif schedule == "cosine":
        after = peak * (0.1 + 0.9 * 0.5 * (1 + ops.cos(math.pi * progress)))
    else:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    return ops.where(step < warmup, warm, after)


def lr_schedule(cfg: TrainConfig | Mapping, total: int, ops: Any = PYTHON_OPS
                ) -> Callable[[Any], Any]:
    """``step -> learning rate`` of a ``total``-step run with ``cfg``'s peak, warm-up and
    scheduler (:func:`lr_at`), in ``ops``; what each backend sets its optimizer from. Pure."""
    cfg = as_config(cfg)
    warmup = warmup_for(cfg, total)
    return lambda step: lr_at(step, total, cfg.lr, warmup, ops, cfg.lr_scheduler)


# --- the optimizer ------------------------------------------------------------------------------


def torch_optimizer(cfg: TrainConfig | Mapping, params: list):
    """``cfg.optimizer`` over ``params`` (torch tensors) at ``cfg.lr`` with
    ``cfg.weight_decay``, as transformers' ``optim`` names make it: adamw (torch's, betas 0.9 /
    0.999, eps 1e-8, decoupled decay), adamw_8bit (bitsandbytes'), sgd (no momentum, decay
    as L2), adafactor (transformers', at the given lr: no relative step or parameter
    scaling, as mlx's with the same options). The loop sets each step's lr."""
    import torch

    cfg = as_config(cfg)
    lr, decay = cfg.lr, cfg.weight_decay
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=decay)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                   weight_decay=decay)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=decay)


# --- the data order ----------------------------------------------------------------------------


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


def slot_orders(job: TrainJob | Mapping, accum: int,
                dist: Distributed) -> list[Callable[[int], list[int]]]:
    """For each micro-batch of a step this rank computes (its slots, see
    :mod:`edge_tune.data.sharding`): step -> positions in ``job.examples`` (this rank's
    shard; ``job.example_index`` holds their record indices)."""
    job = TrainJob.of(job)
    examples, cfg = job.examples, job.config
    slots = accum * dist.world
    index = job.example_index or list(range(len(examples)))
    orders = []
    for slot in sharding.rank_slots(dist.rank, accum):
        members = [k for k, i in enumerate(index) if sharding.slot_of(i, slots) == slot]
        if not members:
            raise DataError(f"too few training examples for {slots} micro-batches per step "
                            f"(slot {slot} is empty): lower --grad-accum or --nproc")
        order = sharding.SlotOrder([len(examples[k].input_ids) for k in members],
                                   cfg.batch_size, cfg.seed, slot, length_grouped_batches)
        orders.append(lambda step, m=members, o=order: [m[k] for k in o.batch(step)])
    return orders


# --- several processes -------------------------------------------------------------------------


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


def final_loss(losses: list[float]) -> float:
    """The run's reported loss: the mean of the last fifth of the steps (1 to 10 of them);
    NaN when no step was logged."""
    tail = losses[-max(1, min(10, len(losses) // 5)):] or [float("nan")]
    return sum(tail) / len(tail)


def pair_means(batches: list[tuple[int, tuple[float, ...]]]) -> tuple[float, float, float]:
    """(loss, reward margin, reward accuracy) over preference pairs: the means of per-batch
    values, each weighted by its batch's number of pairs. ``batches``: (pairs, (loss,
    margin, accuracy)) per batch; zeros when there are none."""
    n = sum(count for count, _ in batches)
    loss, margin, accuracy = (sum(count * values[i] for count, values in batches) / max(1, n)
                              for i in range(3))
    return loss, margin, accuracy



def preference_line(cfg: TrainConfig) -> str:
    """What a preference run says it optimises, one line (the same on every backend)."""
    if cfg.method == "kto":
        return (f"KTO on unpaired answers, beta {cfg.beta}, weights desirable "
                f"{cfg.desirable_weight:g} / undesirable {cfg.undesirable_weight:g}; reference "
                "= the base (adapter off); KL estimated on mismatched answers of each batch")
    return (f"{cfg.method.upper()} on preference pairs, beta {cfg.beta}"
            + ("; reference = the base (adapter off)" if cfg.method == "dpo" else ""))
