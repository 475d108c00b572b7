"""DPO, ORPO and KTO on the mlx backend: the losses of :mod:`edge_tune.training.preference_loss`
(the CPU backend's, TRL's definitions) in mlx, and the loop that trains a LoRA adapter on
preference pairs.

* DPO (Rafailov et al. 2023, eq. 7, TRL ``DPOTrainer`` sigmoid loss) on summed answer
  log-probabilities; the reference is the same model with its adapter switched off
  (:func:`adapter_off`: each LoRA/DoRA layer swapped for the layer it wraps for one forward
  pass, no gradients), not a second copy of the model.
* ORPO (Hong et al. 2024; TRL ``ORPOTrainer.odds_ratio_loss``) on mean answer log-probabilities
  plus the chosen answers' NLL; no reference pass.
* KTO (Ethayarajh et al. 2024; TRL ``KTOTrainer``) on unpaired answers: the examples, then
  their mismatched KL rows (:func:`kto_loss`); the reference as DPO's.

mlx-lm has no preference trainer, so the loop is here: the same batches of pairs as the CPU
backend (chosen rows, then rejected rows, answer tokens trained), the same schedule, clipping
and AdamW as mlx-lm's SFT path in :mod:`edge_tune.training.backends.mlx`, and the same ``Metric``
events with ``reward_margin`` / ``reward_accuracy``. Arrays: ``tokens`` (2n, width) int32,
``mask`` (2n, width − 1) float32 (1 where the next token is trained); per-pair values (n,).
mlx is imported inside the functions only.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from typing import Callable

from edge_tune.training.loop import (final_loss, length_grouped_batches, lr_at, pair_means,
                                     preference_line)
from edge_tune.training.backends.mlx_batches import pair_arrays, pair_rows
from edge_tune.events import Log, Metric

REWARD_FIELDS = ("reward_margin", "reward_accuracy")  # as the CPU backend's Metric fields
LN2 = 0.6931471805599453


@dataclass
class PairLoss:
    """One batch's loss (0-d array) and the implicit rewards of its pairs ((n,) arrays)."""
    loss: object
    chosen_rewards: object
    rejected_rewards: object

    def stats(self) -> tuple[float, float]:
        """(mean reward margin chosen − rejected, share of pairs whose chosen reward is
        higher): what the CPU backend's ``PreferenceLoss.stats`` reports."""
        margin = self.chosen_rewards - self.rejected_rewards
        return float(margin.mean()), float((margin > 0).astype(margin.dtype).mean())


def sequence_logps(model, tokens, mask):
    """(sum of the trained tokens' log-probabilities, their count) per row, float32, (rows,)."""
    import mlx.core as mx
    import mlx.nn as nn

    logits = model(tokens[:, :-1]).astype(mx.float32)
    token_logps = -nn.losses.cross_entropy(logits, tokens[:, 1:])  # (rows, width − 1)
    return (token_logps * mask).sum(axis=1), mask.sum(axis=1)


@contextlib.contextmanager
def adapter_off(model):
    """The model without its adapter: every mlx-lm LoRA/DoRA layer is swapped for the linear
    or embedding layer it wraps, and swapped back on exit (the base weights are shared, no
    copy)."""
    from mlx.utils import tree_unflatten

    wrapped = [(name, m) for name, m in model.named_modules()
               if "lora_a" in m and hasattr(m, "scale")
               and (hasattr(m, "linear") or hasattr(m, "embedding"))]
    inner = [(name, getattr(m, "linear", None) or m.embedding) for name, m in wrapped]
    model.update_modules(tree_unflatten(inner))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(wrapped))


def reference_logps(model, tokens, mask):
    """DPO's reference: summed answer log-probabilities with the adapter switched off, no
    gradients ((rows,))."""
    import mlx.core as mx

    with adapter_off(model):
        sums, _ = sequence_logps(model, tokens, mask)
    return mx.stop_gradient(sums)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> PairLoss:
    """DPO's sigmoid loss (mean over pairs) from summed answer log-probabilities."""
    import mlx.core as mx
    import mlx.nn as nn

    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = -nn.log_sigmoid(beta * logits)
    return PairLoss(losses.mean(), mx.stop_gradient(beta * (policy_chosen - ref_chosen)),
                    mx.stop_gradient(beta * (policy_rejected - ref_rejected)))


def log1mexp(x):
    """``log(1 − exp(x))`` for x < 0 without cancellation (branch at −ln 2, as TRL)."""
    import mlx.core as mx

    # both branches are evaluated: clamp each one's input to where it is finite
    low = mx.log1p(-mx.exp(mx.minimum(x, -LN2)))
    high = mx.log(-mx.expm1(mx.minimum(mx.maximum(x, -LN2), -1e-30)))
    return mx.where(x < -LN2, low, high)


def orpo_loss(mean_chosen, mean_rejected, nll_chosen, lam: float) -> PairLoss:
    """ORPO's loss from mean answer log-probabilities (per token) and the chosen answers'
    NLL (mean over their tokens)."""
    import mlx.core as mx
    import mlx.nn as nn

    log_odds = (mean_chosen - mean_rejected) - (log1mexp(mean_chosen) - log1mexp(mean_rejected))
    ratio = nn.log_sigmoid(log_odds)
    return PairLoss(nll_chosen - lam * ratio.mean(), mx.stop_gradient(lam * mean_chosen),
                    mx.stop_gradient(lam * mean_rejected))


@dataclass
class KTOBatchLoss:
    """A KTO batch's loss (0-d array), each answer's implicit reward ``β(log πθ − log πref)``
    ((n,) array) and its label (``desirable``: (n,) float, 1 = desirable)."""
    loss: object
    rewards: object
    desirable: object

    def stats(self) -> tuple[float, float]:
        """What the CPU backend's ``KTOLoss.stats`` reports: (mean desirable reward − mean
        undesirable reward, share of answers whose reward has their label's sign)."""
        import numpy as np

        r, d = np.array(self.rewards), np.array(self.desirable) > 0.5
        margin = (float(r[d].mean()) if d.any() else 0.0) - \
            (float(r[~d].mean()) if (~d).any() else 0.0)
        right = int((r[d] > 0).sum()) + int((r[~d] < 0).sum())
        return margin, right / max(1, len(r))


def kto_loss(policy, ref, policy_kl, ref_kl, desirable, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> KTOBatchLoss:
    """KTO's loss (TRL ``KTOTrainer``, ``loss_type="kto"``; the CPU backend's
    ``preference_loss.kto_loss``): summed answer log-probabilities of the examples and of
    their KL rows ((n,) each), ``desirable`` (n,) float 1/0."""
    import mlx.core as mx

    kl = mx.maximum(mx.stop_gradient((policy_kl - ref_kl).mean()), 0)
    ratios = policy - ref
    good = desirable_weight * (1 - mx.sigmoid(beta * (ratios - kl)))
    bad = undesirable_weight * (1 - mx.sigmoid(beta * (kl - ratios)))
    losses = mx.where(desirable > 0.5, good, bad)
    return KTOBatchLoss(losses.mean(), mx.stop_gradient(beta * ratios), desirable)


def kto_terms(batch: list, cfg) -> tuple:
    """(desirable (n,) float32 array, desirable weight, undesirable weight) of a batch of
    ``KTOExample`` under ``cfg`` (a TrainConfig)."""
    import mlx.core as mx

    return (mx.array([float(e.desirable) for e in batch], dtype=mx.float32),
            cfg.desirable_weight, cfg.undesirable_weight)


def pair_loss(model, tokens, mask, method: str, beta: float, ref=None, kto=None):
    """The loss of one batch of pairs (rows ``[:n]`` chosen, ``[n:]`` rejected): a
    :class:`PairLoss`. DPO and KTO need ``ref`` (:func:`reference_logps` of the same batch;
    computed here when None). KTO's rows are the examples then their KL rows, ``kto`` is
    :func:`kto_terms` of the batch, and the result a :class:`KTOBatchLoss`."""
    import mlx.core as mx

    n = tokens.shape[0] // 2
    if method == "kto":
        if ref is None:
            ref = reference_logps(model, tokens, mask)
        sums, _ = sequence_logps(model, tokens[:n], mask[:n])
        kl_sums = mx.stop_gradient(sequence_logps(model, tokens[n:], mask[n:])[0])
        return kto_loss(sums, ref[:n], kl_sums, ref[n:], kto[0], beta, *kto[1:])
    sums, counts = sequence_logps(model, tokens, mask)
    if method == "orpo":
        means = sums / mx.maximum(counts, 1)
        nll = -sums[:n].sum() / mx.maximum(counts[:n].sum(), 1)
        return orpo_loss(means[:n], means[n:], nll, beta)
    if ref is None:
        ref = reference_logps(model, tokens, mask)
    return dpo_loss(sums[:n], sums[n:], ref[:n], ref[n:], beta)


def evaluate_pairs(model, pairs: list, batch_size: int, pad_id: int, limit: int,
                   method: str, beta: float, cfg=None) -> tuple[float, float, float]:
    """(mean loss, reward margin, reward accuracy) over ``pairs``, weighted by pairs (as the
    CPU backend's ``evaluate_pairs``); no gradients. ``cfg``: the run's TrainConfig (KTO's
    weights)."""
    import mlx.core as mx

    batches = []
    model.eval()
    for k in range(0, len(pairs), batch_size):
        batch = pairs[k:k + batch_size]
        tokens, mask = (mx.array(a) for a in pair_arrays(batch, pad_id, limit))
        out = pair_loss(model, tokens, mask, method, beta,
                        kto=kto_terms(batch, cfg) if method == "kto" else None)
        batches.append((len(batch), (float(out.loss), *out.stats())))
    model.train()
    return pair_means(batches)


def fit(model, optimizer, job, emit: Callable, total: int, steps_per_epoch: int,
        warmup: int, accum: int, evals: set[int],
        keep: Callable[[int, float | None], object] = lambda step, val: None) -> dict:
    """Train ``model``'s trainable (LoRA) parameters on the ``PairExample`` list
    ``job.examples`` for ``total`` optimizer steps of ``accum`` micro-batches of
    ``cfg.batch_size`` pairs each; ``optimizer`` carries the schedule and clipping. Emits a
    ``Metric`` per step with the reward margin and accuracy, and validation after the
    ``evals`` steps; then ``keep(step, its validation loss or None)`` (``--save-total-limit``).
    Returns losses (per step), val_loss, tokens, train_seconds."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map

    cfg = job.config
    method, beta, limit, pad_id = cfg.method, cfg.beta, cfg.seq_len, job.pad_id
    examples, val_examples = job.examples, job.val_examples
    emit(Log(preference_line(cfg)))
    kto = method == "kto"
    batch_loss = KTOBatchLoss if kto else PairLoss

    def loss_fn(model_, tokens, mask, ref, terms):
        out = pair_loss(model_, tokens, mask, method, beta, ref, terms)
        if kto:
            return out.loss, out.rewards, out.desirable
        return out.loss, out.chosen_rewards, out.rejected_rewards

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    rng = random.Random(cfg.seed)

    def batches():
        while True:
            for batch in length_grouped_batches([p.longest for p in examples], cfg.batch_size,
                                                rng):
                yield [examples[i] for i in batch]

    stream = batches()
    losses: list[float] = []
    tokens_done, val_loss = 0, None
    start, paused = time.perf_counter(), 0.0
    model.train()
    for step in range(total):
        grads, step_loss, rewards = None, 0.0, [0.0, 0.0]
        for _ in range(accum):
            pairs = next(stream)
            tokens, mask = (mx.array(a) for a in pair_arrays(pairs, pad_id, limit))
            ref = reference_logps(model, tokens, mask) if method in ("dpo", "kto") else None
            (loss, chosen, rejected), g = loss_and_grad(model, tokens, mask, ref,
                                                        kto_terms(pairs, cfg) if kto else None)
            grads = g if grads is None else tree_map(lambda a, b: a + b, grads, g)
            mx.eval(loss, grads)
            step_loss += float(loss) / accum
            rewards = [r + v / accum for r, v in
                       zip(rewards, batch_loss(loss, chosen, rejected).stats())]
            tokens_done += sum(min(len(r.input_ids), limit) for r in pair_rows(pairs, limit))
        if accum > 1:
            grads = tree_map(lambda a: a / accum, grads)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        losses.append(step_loss)
        elapsed = time.perf_counter() - start - paused
        emit(Metric(step=step + 1, total_steps=total, loss=step_loss,
                    tokens_per_second=tokens_done / max(elapsed, 1e-9),
                    eta_seconds=elapsed / (step + 1) * (total - step - 1),
                    learning_rate=lr_at(step, total, cfg.lr, warmup, schedule=cfg.lr_scheduler),
                    epoch=(step + 1) / steps_per_epoch, **dict(zip(REWARD_FIELDS, rewards))))
        if step + 1 in evals:
            t_eval = time.perf_counter()
            val_loss, *val_stats = evaluate_pairs(model, val_examples, cfg.batch_size, pad_id,
                                                  limit, method, beta, cfg)
            paused += time.perf_counter() - t_eval  # tok/s counts training time only
            emit(Metric(step=step + 1, total_steps=total, loss=val_loss, split="val",
                        epoch=(step + 1) / steps_per_epoch,
                        **dict(zip(REWARD_FIELDS, val_stats))))
        keep(step + 1, val_loss if step + 1 in evals else None)
    return {"losses": losses, "final_loss": final_loss(losses), "val_loss": val_loss,
            "tokens": tokens_done, "train_seconds": time.perf_counter() - start - paused}
