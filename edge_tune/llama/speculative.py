"""Speculative decoding by prompt lookup: guessed tokens checked by the model in one decode.

An answer that copies from its prompt (JSON fields from an email, a quoted name, code being
edited) or repeats itself can be guessed: find the last few tokens of the text so far earlier
in it (prompt and answer), and guess that what followed them there follows again. The guess
(the *draft*) is evaluated with the sampled token in one decode, every row with logits;
llama-cpp-python's generation loop then samples at each drafted position in turn and keeps
the draft up to the first token it would not have sampled
(:meth:`edge_tune.llama.native.SeqLlama.answering`). Each kept token costs a row instead of a
decode: on this project's CPUs an extra row of the default model costs ~0.45 of a one-row
decode (docs/serving.md, "Speculative decoding"), so a draft pays when about half of it is
kept, and a rejected one costs its rows.

Exact: every row's logits equal a one-row decode's (:mod:`edge_tune.llama.batch_rows`), and
the answer's sampler runs once per kept token, as without a draft, so a greedy answer is the
same token for token, and a sampled one too for the same seed (the same RNG draws on the
same distributions), not merely the same distribution.

``auto`` drafts only what is likely to be kept: a guess of at least ``draft_min`` tokens
after a match of at least two tokens, no longer than what the previous guesses earned (a
fully kept guess restores ``draft_max``, a partly kept one shrinks the next to what was kept
plus one), after a guess rejected at its first token none for the next 2, 4, 8... tokens
(up to :data:`MAX_PAUSE`), and beside other sequences only while the share of guessed
tokens kept in this answer beats what a row costs there: with ``B`` sequences decoding
together a step of ``B`` rows makes ``B`` tokens, so a guessed row pays when it is kept more
often than ``B / (B +`` :data:`STEP_ROWS```)`` (0.6 beside one other, 0.75 beside three).
``ngram`` drafts whenever a match is found.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("auto", "ngram", "off")
MAX_PAUSE = 32  # sampled tokens without a draft after repeated misses (auto)
# a decode's fixed cost in rows: one row of the default model takes ~19 ms, each further row
# with logits ~8.5 ms more (1 thread, docs/serving.md "Speculative decoding")
STEP_ROWS = 1.3
PRIOR = (3, 3)  # (kept, guessed) an answer starts with: its first guesses are made


@dataclass(frozen=True)
class Speculative:
    """How an engine drafts: ``mode`` one of :data:`MODES`; ``draft_max`` and ``draft_min``
    (tokens of one guess, 1-64); ``ngram``: the longest run of last tokens looked up
    (shorter ones are tried down to 2; ``ngram`` 1 looks up the last token alone)."""

    mode: str = "auto"
    draft_max: int = 10
    draft_min: int = 2
    ngram: int = 4

    def __post_init__(self) -> None:
        from edge_tune.errors import UsageError

        if self.mode not in MODES:
            raise UsageError(f"expected one of {', '.join(MODES)}",
                             setting="speculative", value=self.mode)
        if not 1 <= self.draft_min <= self.draft_max <= 64:
            raise UsageError(f"--draft-min {self.draft_min} / --draft-max {self.draft_max}: "
                             "expected 1 <= draft-min <= draft-max <= 64")
        if not 1 <= self.ngram <= 16:
            raise UsageError("expected 1 to 16",
                             setting="spec_ngram", value=self.ngram)

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def drafter(self, crowd=None) -> "NgramDraft | None":
        """A fresh drafter for one answer, or None when off; ``crowd()``: how many
        sequences decode together now (None: one)."""
        return NgramDraft(self, crowd) if self.on else None


class NgramDraft:
    """Prompt-lookup drafter for one answer, with llama-cpp-python's ``draft_model``
    protocol: called with the answer's tokens so far (numpy int array: prompt, kept answer
    tokens, the token just sampled), returns the guessed next tokens (numpy int array,
    possibly empty). ``drafted``/``kept``: tokens guessed and kept so far."""

    def __init__(self, spec: Speculative, crowd=None) -> None:
        self.spec = spec
        self.crowd = crowd
        self.auto = spec.mode == "auto"
        self.limit = spec.draft_max
        self.pause = 0  # calls left without a draft (auto)
        self.misses = 0  # guesses in a row rejected at their first token
        self.drafted = 0
        self.kept = 0
        self.verifies = 0  # guesses checked
        self._last: tuple[int, list] | None = None  # (position, tokens) of the last guess

    def __call__(self, input_ids, /, **_):
        import numpy as np

        ids = np.asarray(input_ids)
        self._settle(ids)
        empty = np.array([], dtype=np.intc)
        if self.pause > 0:
            self.pause -= 1
            return empty
        together = self.crowd() if self.auto and self.crowd is not None else 1
        if together > 1:  # alone, the pauses above are enough
            kept, guessed = self.kept + PRIOR[0], self.drafted + PRIOR[1]
            if kept / guessed <= together / (together + STEP_ROWS):
                return empty
        draft = lookup(ids, self.spec.ngram, min(2, self.spec.ngram), self.limit,
                       self.spec.draft_min)
        if draft.size == 0:
            return empty
        self._last = (len(ids), [int(t) for t in draft])
        self.drafted += int(draft.size)
        self.verifies += 1
        return draft.astype(np.intc)

    def _settle(self, ids) -> None:
        """Count what the model kept of the last guess (the tokens now at its positions)
        and set the next guess's length (auto)."""
        if self._last is None:
            return
        start, draft = self._last
        self._last = None
        kept = 0
        for want, got in zip(draft, ids[start:].tolist()):
            if want != got:
                break
            kept += 1
        self.kept += kept
        if not self.auto:
            return
        if kept == len(draft):
            self.limit, self.misses = self.spec.draft_max, 0
        elif kept > 0:
            self.limit, self.misses = max(self.spec.draft_min, kept + 1), 0
        else:
            self.misses += 1
            self.limit = self.spec.draft_min
            self.pause = min(2 ** self.misses, MAX_PAUSE)


def lookup(ids, n_max: int, n_min: int, limit: int, least: int):
    """The tokens that followed the latest earlier occurrence of the last ``n`` tokens of
    ``ids`` (numpy int array), for the longest ``n`` from ``n_max`` down to ``n_min`` with
    at least ``least`` such tokens: at most ``limit`` of them (numpy array, empty when no
    occurrence qualifies). Pure."""
    import numpy as np

    size = len(ids)
    empty = ids[:0]
    if size < 2:
        return empty
    # candidates: earlier positions holding the last token, latest first, with room after
    ends = np.flatnonzero(ids[:size - 1] == ids[-1])[::-1]
    ends = ends[ends + least < size]
    if ends.size == 0:
        return empty
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        tail = ids[size - n:]
        for end in ends.tolist():
            start = end - n + 1
            if start >= 0 and np.array_equal(ids[start:end + 1], tail):
                return ids[end + 1:min(end + 1 + limit, size)]
    return empty
