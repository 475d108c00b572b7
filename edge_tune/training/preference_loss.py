"""DPO and ORPO losses and the per-sequence log-probabilities they compare (torch, CPU backend).

Definitions follow TRL (``trl.DPOTrainer.dpo_loss`` with ``loss_type="sigmoid"`` and
``trl.ORPOTrainer.odds_ratio_loss``), which implement the papers:

* DPO, Rafailov et al. 2023, eq. 7: ``-log σ(β[(log πθ(yw|x) − log πref(yw|x)) −
  (log πθ(yl|x) − log πref(yl|x))])`` with summed token log-probabilities of each answer; the
  implicit rewards are ``β (log πθ(y|x) − log πref(y|x))``.
* ORPO, Hong et al. 2024, eq. 6-7: ``L_SFT + λ · (−log σ(log odds(yw|x) − log odds(yl|x)))``
  with ``odds(y|x) = P / (1 − P)`` and ``log P`` the *mean* token log-probability of the
  answer; ``L_SFT`` is the NLL of the chosen answer; the rewards TRL logs are ``λ log P``.

Inputs are 1-D tensors of shape (batch,): one value per preference pair. torch is imported
inside the functions only.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_tune.data.template import IGNORE

LOSS_CHUNK = 128  # positions per slice of the vocabulary projection


@dataclass
class PreferenceLoss:
    """One batch's loss (a 0-d tensor, with gradients) and what the run reports of it."""
    loss: object
    chosen_rewards: object  # (batch,) detached
    rejected_rewards: object  # (batch,) detached

    def stats(self) -> tuple[float, float]:
        """(mean reward margin chosen − rejected, share of pairs whose chosen reward is
        higher)."""
        margin = self.chosen_rewards - self.rejected_rewards
        return float(margin.mean()), float((margin > 0).float().mean())


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
             beta: float) -> PreferenceLoss:
    """DPO's sigmoid loss (mean over pairs) from summed answer log-probabilities."""
    import torch.nn.functional as F

    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = -F.logsigmoid(beta * logits)
    return PreferenceLoss(losses.mean(), (beta * (policy_chosen - ref_chosen)).detach(),
                          (beta * (policy_rejected - ref_rejected)).detach())


def log1mexp(x):
    """``log(1 − exp(x))`` for x < 0 without cancellation (branch at −ln 2, as TRL)."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)),
                       torch.log(-torch.expm1(x)))


def orpo_loss(mean_chosen, mean_rejected, nll_chosen, lam: float) -> PreferenceLoss:
    """ORPO's loss from mean answer log-probabilities (per token) and the chosen answers'
    NLL (mean over their tokens)."""
    import torch.nn.functional as F

    log_odds = (mean_chosen - mean_rejected) - (log1mexp(mean_chosen) - log1mexp(mean_rejected))
    ratio = F.logsigmoid(log_odds)
    return PreferenceLoss(nll_chosen - lam * ratio.mean(), (lam * mean_chosen).detach(),
                          (lam * mean_rejected).detach())


def _chunk_logps(head, hidden, targets, cap):
    logits = head(hidden)
    if cap:
        logits = (logits / cap).tanh() * cap
    return logits.float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]


def sequence_logps(model, ids, labels, mask):
    """(sum of log-probabilities of each row's trained tokens, their count), both shape
    (rows,). Logits only at trained positions, ``LOSS_CHUNK`` at a time and recomputed in
    backward (as ``cpu.response_loss``)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    causal_lm = model.get_base_model()
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(targets)[keep]
    hidden, targets = hidden[:, :-1][keep], targets[keep]
    head = causal_lm.get_output_embeddings()
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    parts = [checkpoint(_chunk_logps, head, hidden[i:i + LOSS_CHUNK], targets[i:i + LOSS_CHUNK],
                        cap, use_reentrant=False) for i in range(0, len(targets), LOSS_CHUNK)]
    token_logps = torch.cat(parts) if parts else hidden.new_zeros((0,), dtype=torch.float32)
    zeros = torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device)  # CPU or GPU
    sums = zeros.index_add(0, rows, token_logps)
    counts = zeros.index_add(0, rows, torch.ones_like(token_logps))
    return sums, counts


def pair_loss(model, ids, labels, mask, method: str, beta: float) -> PreferenceLoss:
    """The loss of one batch of pairs: rows ``[:n]`` are the chosen sequences, ``[n:]`` the
    rejected ones of the same pairs (``ids``, ``labels``, ``mask``: (2n, width)). DPO's
    reference is the same model with the LoRA adapter switched off (PEFT
    ``disable_adapter``), without gradients: no second copy of the model."""
    import torch

    n = ids.shape[0] // 2
    sums, counts = sequence_logps(model, ids, labels, mask)
    if method == "orpo":
        means = sums / counts.clamp(min=1)
        nll = -sums[:n].sum() / counts[:n].sum().clamp(min=1)
        return orpo_loss(means[:n], means[n:], nll, beta)
    with torch.no_grad(), model.disable_adapter():
        ref, _ = sequence_logps(model, ids, labels, mask)
    return dpo_loss(sums[:n], sums[n:], ref[:n], ref[n:], beta)
