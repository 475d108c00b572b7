"""Drift's tie-aware changed share: a changed answer counts only when it parts from the base's
answer where the base was decided (edge_tune.eval.drift.divergence_gap), on synthetic rows."""

from __future__ import annotations

import numpy as np

from edge_tune.eval.drift import TIE_MARGIN, changed_at_tie, divergence_gap
from edge_tune.eval.measure import log_softmax

VOCAB = 6


def rows(*logits: dict[int, float]):
    """Base log-probabilities, one row per dict (token -> logit; the others at -5)."""
    out = np.full((len(logits), VOCAB), -5.0)
    for r, row in enumerate(logits):
        for token, value in row.items():
            out[r, token] = value
    return log_softmax(out)


# the base answers [1, 2] then ends (token 0: its end of turn); row 1 is a near-tie of 2 and 3
BASE_IDS = [1, 2]
BASE = rows({1: 4.0}, {2: 1.0, 3: 1.0 - TIE_MARGIN / 4, 4: -1.0}, {0: 3.0, 5: 0.5})


def test_a_part_at_a_near_tie_is_a_tie():
    gap = divergence_gap(BASE, BASE_IDS, [1, 3, 5])
    assert abs(gap - TIE_MARGIN / 4) < 1e-9
    assert changed_at_tie(True, gap)


def test_a_part_where_the_base_was_decided_is_a_change():
    gap = divergence_gap(BASE, BASE_IDS, [1, 4])  # logit 1 against -1: 2 nats
    assert abs(gap - 2.0) < 1e-9
    assert not changed_at_tie(True, gap)
    assert divergence_gap(BASE, BASE_IDS, [5, 2]) > 8  # at the first token already


def test_the_first_part_decides_not_a_later_one():
    # parts at the tie (position 1); that position 2 would differ too is not looked at
    assert changed_at_tie(True, divergence_gap(BASE, BASE_IDS, [1, 3, 4, 4]))


def test_an_answer_that_goes_on_is_compared_with_the_base_ending():
    gap = divergence_gap(BASE, BASE_IDS, [1, 2, 5])  # the base's last row: end 3.0, 5 at 0.5
    assert abs(gap - 2.5) < 1e-9 and not changed_at_tie(True, gap)


def test_an_answer_that_ends_early_is_compared_with_the_end_token():
    gap = divergence_gap(BASE, BASE_IDS, [1], end_id=0)  # row 1: token 2 at 1.0, end at -5
    assert abs(gap - 6.0) < 1e-9
    # without the end token the part cannot be placed: a real change, as before
    assert divergence_gap(BASE, BASE_IDS, [1]) is None
    assert changed_at_tie(True, None) is False


def test_unchanged_answers_are_never_ties():
    assert divergence_gap(BASE, BASE_IDS, list(BASE_IDS)) is None
    assert not changed_at_tie(False, 0.0)


def test_the_margin_is_the_boundary():
    assert changed_at_tie(True, TIE_MARGIN) and not changed_at_tie(True, TIE_MARGIN + 1e-6)
    assert changed_at_tie(True, -0.2)  # the retokenized base token was not its top choice
