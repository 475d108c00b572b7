"""DPO and ORPO on the mlx backend: the losses of :mod:`edge_tune.training.preference_loss`
(the CPU backend's, TRL's definitions) in mlx, and the loop that trains a LoRA adapter on
preference pairs.

* DPO (Rafailov et al. 2023, eq. 7, TRL ``DPOTrainer`` sigmoid loss) on summed answer
  log-probabilities; the reference is the same model with its adapter switched off
  (:func:`adapter_off`: each LoRA/DoRA layer swapped for the layer it wraps for one forward
  pass, no gradients), not a second copy of the model.
* ORPO (Hong et al. 2024; TRL ``ORPOTrainer.odds_ratio_loss``) on mean answer log-probabilities
  plus the chosen answers' NLL; no reference pass.

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

from edge_tune.training.loop import final_loss, length_grouped_batches, lr_at, pair_means
from edge_tune.training.backends.mlx_batches import pair_arrays
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


def pair_loss(model, tokens, mask, method: str, beta: float, ref=None) -> PairLoss:
    """The loss of one batch of pairs (rows ``[:n]`` chosen, ``[n:]`` rejected). DPO needs
    ``ref`` (:func:`reference_logps` of the same batch; computed here when None)."""
    import mlx.core as mx

    n = tokens.shape[0] // 2
    sums, counts = sequence_logps(model, tokens, mask)
    if method == "orpo":
        means = sums / mx.maximum(counts, 1)
        nll = -sums[:n].sum() / mx.maximum(counts[:n].sum(), 1)
        return orpo_loss(means[:n], means[n:], nll, beta)
    if ref is None:
        ref = reference_logps(model, tokens, mask)
    return dpo_loss(sums[:n], sums[n:], ref[:n], ref[n:], beta)


def evaluate_pairs(model, pairs: list, batch_size: int, pad_id: int, limit: int,
                   method: str, beta: float) -> tuple[float, float, float]:
    """(mean loss, reward margin, reward accuracy) over ``pairs``, weighted by pairs (as the
    CPU backend's ``evaluate_pairs``); no gradients."""
    import mlx.core as mx

    batches = []
    model.eval()
    for k in range(0, len(pairs), batch_size):
        batch = pairs[k:k + batch_size]
        tokens, mask = (mx.array(a) for a in pair_arrays(batch, pad_id, limit))
        out = pair_loss(model, tokens, mask, method, beta)
        batches.append((len(batch), (float(out.loss), *out.stats())))
    model.train()
    return pair_means(batches)


def fit(model, optimizer, job, emit: Callable, total: int, steps_per_epoch: int,
        warmup: int, accum: int, evals: set[int]) -> dict:
    """Train ``model``'s trainable (LoRA) parameters on the ``PairExample`` list
    ``job.examples`` for ``total`` optimizer steps of ``accum`` micro-batches of
    ``cfg.batch_size`` pairs each; ``optimizer`` carries the schedule and clipping. Emits a
    ``Metric`` per step with the reward margin and accuracy, and validation after the
    ``evals`` steps. Returns losses (per step), val_loss, tokens, train_seconds."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map

    cfg = job.config
    method, beta, limit, pad_id = cfg.method, cfg.beta, cfg.seq_len, job.pad_id
    examples, val_examples = job.examples, job.val_examples
    emit(Log(f"{method.upper()} on preference pairs, beta {beta}"
             + ("; reference = the base (adapter off)" if method == "dpo" else "")))

    def loss_fn(model_, tokens, mask, ref):
        out = pair_loss(model_, tokens, mask, method, beta, ref)
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
            ref = reference_logps(model, tokens, mask) if method == "dpo" else None
            (loss, chosen, rejected), g = loss_and_grad(model, tokens, mask, ref)
            grads = g if grads is None else tree_map(lambda a, b: a + b, grads, g)
            mx.eval(loss, grads)
            step_loss += float(loss) / accum
            rewards = [r + v / accum for r, v in
                       zip(rewards, PairLoss(loss, chosen, rejected).stats())]
            tokens_done += sum(min(len(p.input_ids), limit) + min(len(p.rejected_ids), limit)
                               for p in pairs)
        if accum > 1:
            grads = tree_map(lambda a: a / accum, grads)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        losses.append(step_loss)
        elapsed = time.perf_counter() - start - paused
        emit(Metric(step=step + 1, total_steps=total, loss=step_loss,
                    tokens_per_second=tokens_done / max(elapsed, 1e-9),
                    eta_seconds=elapsed / (step + 1) * (total - step - 1),
                    learning_rate=lr_at(step, total, cfg.lr, warmup),
                    epoch=(step + 1) / steps_per_epoch, **dict(zip(REWARD_FIELDS, rewards))))
        if step + 1 in evals:
            t_eval = time.perf_counter()
            val_loss, *val_stats = evaluate_pairs(model, val_examples, cfg.batch_size, pad_id,
                                                  limit, method, beta)
            paused += time.perf_counter() - t_eval  # tok/s counts training time only
            emit(Metric(step=step + 1, total_steps=total, loss=val_loss, split="val",
                        epoch=(step + 1) / steps_per_epoch,
                        **dict(zip(REWARD_FIELDS, val_stats))))
    return {"losses": losses, "final_loss": final_loss(losses), "val_loss": val_loss,
            "tokens": tokens_done, "train_seconds": time.perf_counter() - start - paused}
