"""DPO, ORPO and KTO losses and the per-sequence log-probabilities they compare (torch, CPU
backend).

Definitions follow TRL (``trl.DPOTrainer.dpo_loss`` with ``loss_type="sigmoid"`` and
``trl.ORPOTrainer.odds_ratio_loss``), which implement the papers:

* DPO, Rafailov et al. 2023, eq. 7: ``-log σ(β[(log πθ(yw|x) − log πref(yw|x)) −
  (log πθ(yl|x) − log πref(yl|x))])`` with summed token log-probabilities of each answer; the
  implicit rewards are ``β (log πθ(y|x) − log πref(y|x))``.
* ORPO, Hong et al. 2024, eq. 6-7: ``L_SFT + λ · (−log σ(log odds(yw|x) − log odds(yl|x)))``
  with ``odds(y|x) = P / (1 − P)`` and ``log P`` the *mean* token log-probability of the
  answer; ``L_SFT`` is the NLL of the chosen answer; the rewards TRL logs are ``λ log P``.
* KTO, Ethayarajh et al. 2024, eq. 7 (``trl.KTOTrainer``, ``loss_type="kto"``): unpaired
  answers, see :func:`kto_loss`.

Inputs are 1-D tensors of shape (batch,): one value per preference pair. torch is imported
inside the functions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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


@dataclass
class KTOLoss(PreferenceLoss):
    """A KTO batch's loss; ``chosen_rewards`` are the desirable answers' implicit rewards,
    ``rejected_rewards`` the undesirable ones' (either may be empty); ``kl`` the batch's KL
    estimate (nats)."""
    kl: float = 0.0

    def stats(self) -> tuple[float, float]:
        """(mean desirable reward − mean undesirable reward, as TRL's ``rewards/margins``;
        share of answers whose reward has their label's sign: > 0 desirable, < 0 not). A side
        with no answers counts 0 in the margin."""
        good, bad = self.chosen_rewards, self.rejected_rewards
        margin = (float(good.mean()) if good.numel() else 0.0) - \
            (float(bad.mean()) if bad.numel() else 0.0)
        right = int((good > 0).sum()) + int((bad < 0).sum())
        return margin, right / max(1, good.numel() + bad.numel())


def kto_loss(policy, ref, policy_kl, ref_kl, desirable, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> KTOLoss:
    """KTO's loss (Ethayarajh et al. 2024, eq. 7; TRL ``KTOTrainer`` with ``loss_type="kto"``)
    from summed answer log-probabilities of the batch's examples (``policy``, ``ref``: (n,))
    and of its mismatched KL rows (``policy_kl``, ``ref_kl``: (n,), no gradients needed);
    ``desirable``: (n,) bool. The KL estimate ``z = clamp(mean(policy_kl − ref_kl), 0)`` is a
    constant; a desirable answer's loss is ``1 − σ(β(r − z))``, an undesirable one's
    ``1 − σ(β(z − r))`` with ``r = log πθ − log πref``, weighted, then averaged over the
    batch."""
    import torch

    kl = (policy_kl - ref_kl).mean().detach().clamp(min=0)
    ratios = policy - ref
    good, bad = ratios[desirable], ratios[~desirable]
    losses = torch.cat((desirable_weight * (1 - torch.sigmoid(beta * (good - kl))),
                        undesirable_weight * (1 - torch.sigmoid(beta * (kl - bad)))))
    return KTOLoss(losses.nanmean(), (beta * good).detach(), (beta * bad).detach(), float(kl))


def kto_terms(batch: list, cfg) -> Optional[tuple]:
    """(desirable: (n,) bool tensor, desirable weight, undesirable weight) of a batch of
    ``KTOExample`` under ``cfg`` (a TrainConfig); None for other batches."""
    import torch

    if cfg.method != "kto":
        return None
    return (torch.tensor([e.desirable for e in batch], dtype=torch.bool),
            cfg.desirable_weight, cfg.undesirable_weight)


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


def pair_loss(model, ids, labels, mask, method: str, beta: float,
              kto: Optional[tuple] = None) -> PreferenceLoss:
    """The loss of one batch of pairs: rows ``[:n]`` are the chosen sequences, ``[n:]`` the
    rejected ones of the same pairs (``ids``, ``labels``, ``mask``: (2n, width)). DPO's
    reference is the same model with the LoRA adapter switched off (PEFT
    ``disable_adapter``), without gradients: no second copy of the model. For KTO the rows
    are ``data.preference.kto_rows`` (the examples, then their KL rows) and ``kto`` is
    :func:`kto_terms` of the batch."""
    import torch

    n = ids.shape[0] // 2
    if method == "kto":
        desirable, weights = kto[0], kto[1:]
        sums, _ = sequence_logps(model, ids[:n], labels[:n], mask[:n])
        with torch.no_grad():
            kl_sums, _ = sequence_logps(model, ids[n:], labels[n:], mask[n:])
            with model.disable_adapter():
                ref, _ = sequence_logps(model, ids, labels, mask)
        return kto_loss(sums, ref[:n], kl_sums, ref[n:], desirable.to(ids.device), beta,
                        *weights)
    sums, counts = sequence_logps(model, ids, labels, mask)
    if method == "orpo":
        means = sums / counts.clamp(min=1)
        nll = -sums[:n].sum() / counts[:n].sum().clamp(min=1)
        return orpo_loss(means[:n], means[n:], nll, beta)
    with torch.no_grad(), model.disable_adapter():
        ref, _ = sequence_logps(model, ids, labels, mask)
    return dpo_loss(sums[:n], sums[n:], ref[:n], ref[n:], beta)
