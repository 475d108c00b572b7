"""GRPO's loss equals TRL's: the same rollouts through trl's own ``GRPOTrainer._compute_loss``
(called on a stand-in trainer whose log-prob function returns the test's tensor) and through
``edge_tune.training.grpo_loss``: loss, gradient, KL and clip ratios, for every loss type."""

from __future__ import annotations

import types

import pytest

torch = pytest.importorskip("torch")
trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

from edge_tune.training import grpo_loss as gl  # noqa: E402

B, T, G = 6, 7, 3


class _Acc:
    num_processes = 1

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(logps, inputs, *, loss_type, beta, eps, max_len, is_ratio):
    """TRL's ``_compute_loss`` on a stand-in trainer; (loss, its metrics)."""
    from collections import defaultdict

    me = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type,
        epsilon_low=eps, epsilon_high=eps, use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=True, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=_Acc(), _metrics={"train": defaultdict(list)},
        _entropy_bonus_enabled=False, aux_loss_enabled=False,
        args=types.SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=1))
    me._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    loss = trl_grpo.GRPOTrainer._compute_loss(me, None, inputs)
    return loss, me._metrics["train"]


@pytest.mark.parametrize("loss_type", gl.LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize("stale", [False, True])
def test_loss_matches_trl(loss_type, beta, with_is, stale):
    g = torch.Generator().manual_seed(0)
    base = -torch.rand(B, T, generator=g) * 3
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[4, 2:] = 0
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, float("nan")])
    adv, _ = gl.group_advantages(rewards, G)
    old = (base + 0.3 * torch.randn(B, T, generator=g)) if stale else None
    ref = base + 0.2 * torch.randn(B, T, generator=g)
    sampling = base + 0.1 * torch.randn(B, T, generator=g)
    is_ratio = gl.truncated_is_ratio(base if old is None else old, sampling, mask, 3.0) \
        if with_is else None
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long),
              "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "ref_per_token_logps": ref if beta else None,
              "old_per_token_logps": old, "num_items_in_batch": mask.sum(),
              "importance_sampling_ratio": is_ratio}
    theirs_logps = base.clone().requires_grad_(True)
    theirs, metrics = _trl_loss(theirs_logps, inputs, loss_type=loss_type, beta=beta,
                                eps=0.2, max_len=T, is_ratio=is_ratio)
    theirs.backward()
    mine_logps = base.clone().requires_grad_(True)
    mine = gl.grpo_loss(mine_logps, old, ref if beta else None, mask, adv, loss_type=loss_type,
                        epsilon_low=0.2, epsilon_high=0.2, beta=beta, is_ratio=is_ratio,
                        max_completion_length=T, num_items=float(mask.sum()))
    mine.loss.backward()
    assert float(mine.loss.detach()) == pytest.approx(float(theirs.detach()), rel=1e-6, abs=1e-7)
    assert torch.allclose(mine_logps.grad, theirs_logps.grad, rtol=1e-5, atol=1e-7)
    if beta:
        assert mine.kl == pytest.approx(metrics["kl"][0], rel=1e-6)
    assert mine.clip_low == pytest.approx(metrics["clip_ratio/low_mean"][0])
    assert mine.clip_high == pytest.approx(metrics["clip_ratio/high_mean"][0])
    assert mine.clip_ratio == pytest.approx(metrics["clip_ratio/region_mean"][0])
    if stale:
        assert mine.clip_ratio > 0  # the test reaches the clipped region


def test_advantages_match_trl():
    """TRL's formula (``_generate_and_score_completions``, scale_rewards="group"): mean and
    unbiased std per group, NaN rewards left out of both, unscored completions at 0."""
    from trl.trainer.utils import nanstd

    r = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, 0.3, float("nan"), 0.9])
    adv, std = gl.group_advantages(r, 3)
    grouped = r.view(-1, 3)
    want_std = nanstd(grouped, dim=1).repeat_interleave(3)
    want = (r - torch.nanmean(grouped, dim=1).repeat_interleave(3)) / (want_std + 1e-4)
    want[torch.isnan(r)] = 0.0
    assert torch.allclose(adv, want)
    assert torch.allclose(std, want_std)
    assert adv[3:6].abs().max() == 0  # a group of equal rewards teaches nothing


def test_truncated_is_ratio():
    old = torch.tensor([[0.0, -1.0, -2.0]])
    sampling = torch.tensor([[-2.0, -1.0, float("nan")]])
    ratio = gl.truncated_is_ratio(old, sampling, torch.ones(1, 3), 3.0)
    assert ratio.tolist() == [[3.0, 1.0, 1.0]]  # e^2 capped; equal; NaN -> no correction


def test_frac_reward_zero_std_counts_groups_with_equal_rewards():
    from edge_tune.training.backends.cpu_grpo import frac_zero_std

    assert frac_zero_std([0.0] * 8, 4) == 1.0
    assert frac_zero_std([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0], 4) == 0.5
    assert frac_zero_std([0.5, 0.5, 0.2, 0.3], 2) == 0.5
    assert frac_zero_std([0.1, 0.2, 0.3, 0.4], 4) == 0.0
