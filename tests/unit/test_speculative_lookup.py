"""Prompt lookup (edge_tune.llama.speculative): what it guesses, and how auto backs off."""

from __future__ import annotations

import numpy as np
import pytest

from edge_tune.errors import UsageError
from edge_tune.llama.speculative import MAX_PAUSE, PRIOR, STEP_ROWS, NgramDraft, Speculative, \
    lookup


def ids(*values):
    return np.array(values, dtype=np.intc)


def test_lookup_copies_what_followed_the_latest_longest_match():
    # "5 6" occurs twice before the end: the later one, followed by 9 1, wins
    seq = ids(5, 6, 7, 8, 2, 5, 6, 9, 1, 3, 5, 6)
    assert lookup(seq, 4, 2, 10, 2).tolist() == [9, 1, 3, 5, 6]
    assert lookup(seq, 4, 2, 2, 2).tolist() == [9, 1]
    # a longer match beats a later shorter one
    seq = ids(1, 2, 3, 4, 9, 9, 3, 4, 7, 7, 1, 2, 3, 4)
    assert lookup(seq, 4, 2, 3, 2).tolist() == [9, 9, 3]


def test_lookup_finds_nothing_below_the_minimums():
    assert lookup(ids(1, 2, 3, 4), 3, 2, 5, 2).size == 0  # no repeat at all
    assert lookup(ids(7, 8, 1, 7, 8), 3, 2, 5, 2).tolist() == [1, 7, 8]
    assert lookup(ids(7, 8, 1, 7, 8), 3, 2, 5, 4).size == 0  # 3 tokens follow, 4 asked
    assert lookup(ids(3, 1, 2, 4, 5, 1, 3), 3, 2, 5, 2).size == 0  # only 1-grams match
    assert lookup(ids(3, 1, 2, 4, 5, 1, 3), 1, 1, 5, 2).tolist() == [1, 2, 4, 5, 1]


def test_auto_shrinks_after_a_partial_guess_and_pauses_after_misses():
    draft = NgramDraft(Speculative("auto", draft_max=6, draft_min=2))
    assert draft(ids(1, 2, 3, 4, 5, 6, 7, 8, 1, 2)).tolist() == [3, 4, 5, 6, 7, 8]
    # the model kept 3 and 4, then sampled 0: the next guess is at most 3 long
    assert draft(ids(1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 0)).size == 0
    assert (draft.kept, draft.drafted, draft.limit) == (2, 6, 3)
    assert draft(ids(1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 0, 5, 6)).tolist() == [7, 8, 1]
    # all three kept: back to draft_max
    assert draft(ids(1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 0, 5, 6, 7, 8, 1, 9)).size == 0
    assert (draft.kept, draft.limit, draft.pause) == (5, 6, 0)
    # a guess rejected at its first token: no guess for the next 2 sampled tokens (the
    # one that showed the miss included), then 4 after another miss
    draft = NgramDraft(Speculative("auto", draft_max=6, draft_min=2))
    assert draft(ids(1, 2, 3, 4, 1, 2)).tolist() == [3, 4, 1, 2]
    assert draft(ids(1, 2, 3, 4, 1, 2, 9)).size == 0 and draft.pause == 1
    assert draft(ids(1, 2, 3, 4, 1, 2)).size == 0
    assert draft(ids(1, 2, 3, 4, 1, 2)).tolist() == [3, 4]  # draft_min after a miss
    assert draft(ids(1, 2, 3, 4, 1, 2, 9)).size == 0 and draft.pause == 3
    assert MAX_PAUSE >= 4


def test_auto_beside_others_guesses_while_most_guesses_are_kept():
    """Beside three other sequences a guessed row pays only when kept more than 3 times
    in 4 (4 / (4 + STEP_ROWS)): after a guess of 4 is thrown away whole, no more."""
    crowd = [4]
    draft = NgramDraft(Speculative("auto", draft_max=4, draft_min=2), lambda: crowd[0])
    assert PRIOR[0] / PRIOR[1] > 4 / (4 + STEP_ROWS)  # a fresh answer guesses
    assert draft(ids(1, 2, 3, 4, 5, 6, 1, 2)).tolist() == [3, 4, 5, 6]
    text = [1, 2, 3, 4, 5, 6, 1, 2, 9]
    draft(ids(*text))  # none kept: a pause of two tokens
    draft(ids(*text, 7))
    assert draft.pause == 0
    assert draft(ids(*text, 7, 1, 2)).size == 0  # 3 in 7 kept: too few
    crowd[0] = 1  # alone, a row costs less than half a decode: it guesses again
    assert draft(ids(*text, 7, 1, 2)).size > 0


def test_ngram_mode_always_guesses_the_longest():
    draft = NgramDraft(Speculative("ngram", draft_max=4, draft_min=1))
    assert draft(ids(1, 2, 3, 4, 5, 6, 1, 2)).tolist() == [3, 4, 5, 6]
    assert draft(ids(1, 2, 3, 4, 5, 6, 1, 2, 9)).size == 0  # nothing to match: no pause
    assert draft.pause == 0


@pytest.mark.parametrize("kw", [{"mode": "fast"}, {"draft_min": 5, "draft_max": 4},
                                {"draft_max": 65}, {"ngram": 0}])
def test_bad_settings_are_one_clear_error(kw):
    with pytest.raises(UsageError):
        Speculative(**kw)


@pytest.mark.parametrize("args", [["serve", "--speculative", "fast"],
                                  ["serve", "--draft-min", "3", "--draft-max", "2"],
                                  ["chat", "--speculative", "fast", "--prompt", "hi"]])
def test_bad_speculative_options_are_one_line_before_a_model_loads(args):
    from tests.helpers.cli import assert_one_line_error, run_cli_in_process

    assert_one_line_error(run_cli_in_process(*args), "--")
