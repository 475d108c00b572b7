"""GRPO's objective, as TRL's ``GRPOTrainer`` computes it (trl 1.16 ``_compute_loss``), on
rollouts sampled by another engine (llama.cpp here, vLLM in TRL).

Shapes: B completions (G per prompt, consecutive), T completion positions (right-padded;
``mask`` 1 on real tokens). Log-probabilities are per token, of the sampled token, at the
sampling temperature. Names follow TRL: ``epsilon`` (low/high clip), ``beta`` (KL weight, the
reference being the base: the adapter off), ``loss_type`` grpo | dr_grpo | dapo, the
importance-sampling ratio of the trainer's to the sampler's probabilities truncated at
``is_cap`` (TRL's ``vllm_importance_sampling_mode="token_truncate"`` with
``vllm_importance_sampling_clip_max``), KL bias-corrected by the ratio (TRL's default
``use_bias_correction_kl``). Torch is imported inside each function.
"""

from __future__ import annotations

from dataclasses import dataclass

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
STD_EPS = 1e-4  # TRL's: advantages = (r - mean) / (std + 1e-4)


def group_advantages(rewards, num_generations: int, scale: bool = True):
    """TRL's group-normalised advantages of ``rewards`` ((B,) float tensor, NaN = no reward
    scored it): ``(r - group mean) / (group std + 1e-4)`` with the unbiased std over the
    group's scored completions (``scale`` False: not divided). Returns ``(advantages,
    group_std)`` ((B,) each); an unscored completion's advantage is 0."""
    import torch

    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    count = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    var = torch.nanmean((grouped - mean) ** 2, dim=1, keepdim=True) * count / (count - 1)
    std = var.sqrt() if num_generations > 1 else torch.zeros_like(mean)
    adv = grouped - mean
    if scale:
        adv = adv / (std + STD_EPS)
    adv = torch.nan_to_num(adv, nan=0.0).view(-1)
    return adv, std.expand_as(grouped).reshape(-1)


def truncated_is_ratio(old_logps, sampling_logps, mask, cap: float):
    """The per-token importance-sampling ratio ``exp(trainer - sampler)`` of the sampled
    tokens, truncated at ``cap`` ((B, T)); 1 where ``mask`` is 0 or the sampler's
    log-probability is NaN (TRL's ``token_truncate``)."""
    import torch

    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)
    return torch.clamp(torch.exp(diff), max=cap)


@dataclass
class LossOut:
    """The loss of one micro-batch (scalar tensor, with gradients) and its statistics
    (floats): ``kl`` (masked mean of the per-token KL to the reference; 0 without beta),
    ``clip_low`` / ``clip_high`` / ``clip_ratio`` (TRL's ``clip_ratio/*_mean``), ``tokens``
    (completion tokens)."""

    loss: object
    kl: float
    clip_low: float
    clip_high: float
    clip_ratio: float
    tokens: int


def grpo_loss(logps, old_logps, ref_logps, mask, advantages, *, loss_type: str = "dapo",
              epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
              is_ratio=None, max_completion_length: int = 0, num_items: float = 0.0,
              grad_accum: int = 1) -> LossOut:
    """TRL's GRPO loss of one micro-batch. ``logps``: the trainer's per-token
    log-probabilities (B, T) with gradients; ``old_logps``: the same before this step's
    update (detached; None: ``logps.detach()``, one update per rollout); ``ref_logps``: the
    reference's (None when ``beta`` is 0); ``advantages``: (B,); ``is_ratio``: (B, T) from
    :func:`truncated_is_ratio` or None. Normalisation as TRL's: ``grpo`` each sequence's mean
    then the batch mean, ``dr_grpo`` the sum over ``B x max_completion_length``, ``dapo`` the
    sum over ``num_items`` (completion tokens of the whole step's rollouts); grpo and dr_grpo
    are then divided by ``grad_accum``. Raises ValueError for an unknown ``loss_type``."""
    import torch

    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} (expected one of {', '.join(LOSS_TYPES)})")
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    coef_1 = torch.exp(logps - old)
    adv = advantages.unsqueeze(1)
    per_token_kl = None
    if beta != 0.0:
        delta = ref_logps - logps
        per_token_kl = (torch.exp(delta) - delta - 1) * coef_1
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if is_ratio is not None:
        per_token = per_token * is_ratio
    if per_token_kl is not None:
        per_token = per_token + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / grad_accum
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length) \
            / grad_accum
    else:
        loss = (per_token * mask).sum() / max(float(num_items), 1.0)

    def masked_mean(x) -> float:
        return float((x * mask).sum() / mask.sum().clamp(min=1.0))

    with torch.no_grad():
        low = ((coef_1 < 1 - epsilon_low) & (adv < 0)).float()
        high = ((coef_1 > 1 + epsilon_high) & (adv > 0)).float()
        return LossOut(loss, masked_mean(per_token_kl) if per_token_kl is not None else 0.0,
                       masked_mean(low), masked_mean(high),
                       masked_mean(torch.maximum(low, high)), int(mask.sum()))


def completion_logps(model, ids, mask, prompt_len: int, temperature: float):
    """Per-token log-probabilities ((B, T)) of the completion tokens ``ids[:, prompt_len:]``
    under ``model`` (a causal LM; logits divided by ``temperature`` as TRL's), computed only
    at the completion's positions. ``ids``/``mask``: (B, prompt_len + T), prompts
    left-padded, completions right-padded."""
    import torch

    # the transformers model inside a PEFT model
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    states = decoder(input_ids=ids, attention_mask=mask, position_ids=positions
                     ).last_hidden_state
    hidden = states[:, prompt_len - 1:-1]
    logits = causal_lm.get_output_embeddings()(hidden).float() / temperature
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if cap:
        logits = (logits * temperature / cap).tanh() * cap / temperature
    targets = ids[:, prompt_len:]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
