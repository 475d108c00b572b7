"""verify on an adapter that changes nothing: its effect error is 0 (nothing to get wrong),
so "ok" alone would hide that the run learnt nothing; the report says so instead."""

from __future__ import annotations

import numpy as np

from edge_tune.verify import NO_EFFECT_RMS, Tally, VerifyReport, no_effect_line


def _report(t_base, t_tuned, f_base, f_tuned) -> VerifyReport:
    tally = Tally()
    tally.add_effect(t_base, t_tuned, f_base, f_tuned)
    return VerifyReport(effect_rel_err=tally.effect_rel_err, top1=1.0, kl=0.0, n_prompts=1,
                        n_positions=len(t_base), checked="adapter", effect_rms=tally.effect_rms)


def test_an_adapter_without_effect_is_reported_as_such():
    base = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    none = _report(base, base, base, base)
    assert none.ok and none.no_effect and none.to_dict()["no_effect"]
    assert "has no effect" in no_effect_line(none)
    tuned = base + 0.1
    some = _report(base, tuned, base, tuned)
    assert some.ok and not some.no_effect and some.effect_rms > 100 * NO_EFFECT_RMS
    assert not VerifyReport(0.0, 1.0, 0.0, 1, 5, "adapter").no_effect  # not measured
