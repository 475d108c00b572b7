"""Continuous batching: the sequences of many requests decoded together, step by step.

Each admitted request gets a *slot* (a sequence id of the one llama.cpp context, with its
own tokens and KV entries, kept after the answer as that slot's prompt cache) and a thread
that runs the engine's ordinary generation loop (llama-cpp-python's, with the request's
sampling, grammar, logits processors and stop strings) on the slot's sequence
(:meth:`edge_tune.llama.engine.Engine.sequence`). When that loop evaluates tokens, its thread
*parks* them here and waits; the decoding thread gathers the parked rows of every sequence
under the current adapter set into one ``llama_decode`` (the rule of
:mod:`edge_tune.llama.batch_rows` keeps each row's bits independent of the batch), hands each
sequence the index of its logits, and waits until every sequence has sampled and parked again
(or finished) before the next step.
New requests join between steps. All rows of a decode share one adapter set (llama.cpp
applies adapters per context), so sets take turns, :data:`TURN_STEPS` steps at a time while
another set has work, and a sequence waiting for its turn keeps its KV entries.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from edge_tune.errors import Cancelled, EdgeTuneError  # Cancelled: the client went away
from edge_tune.llama.batch_rows import KVFull, Rows, chunks

TURN_STEPS = 16  # decode steps an adapter set keeps the context while another set waits


@dataclass
class Slot:
    """A sequence id of the context and what its KV entries hold."""

    seq_id: int
    view: object  # the engine's sequence on this id (Engine.sequence)
    mix: tuple | None = None  # adapter set its KV entries were computed under
    used: int = 0  # step of its last use, for least-recently-used reuse
    sequence: "Sequence | None" = None  # the request using it now
    key: tuple = ()  # request_key of the request whose prompt its KV entries hold


@dataclass
class Sequence:
    """An admitted request: fresh (its thread renders the prompt), parked (rows wait for a
    decode), running (sampling after a decode) or done."""

    job: object
    slot: Slot
    mix: tuple
    order: int
    state: str = "fresh"
    rows: Rows | None = None
    error: Exception | None = None
    thread: threading.Thread | None = field(default=None, repr=False)
    wake: threading.Condition | None = field(default=None, repr=False)  # its own: waking
    # only the sequences a decode served keeps a step from waking every thread


class Batcher:
    """The decode side of continuous batching over one engine. ``cv`` guards every field;
    the owner (the scheduler's worker thread) calls :meth:`step` in a loop."""

    def __init__(self, engine, cv: threading.Condition, lock) -> None:
        self.engine = engine
        self.cv = cv  # the decoding thread waits on it; ``lock`` is its lock
        self.lock = lock
        self.sample_lock = threading.Lock()  # llama_get_logits_ith is not thread-safe
        # more slots than requests run at once (``engine.parallel``): the spare ones let a
        # request sit next to the others of its adapter set (see :meth:`free_slot`)
        self.slots = [Slot(i, engine.sequence(i, self)) for i in range(engine.batch.streams)]
        self.limit = engine.parallel
        self.live: list[Sequence] = []
        self.steps = 0
        self.turn_steps = 0
        self.switches = 0
        self._order = 0

    # --- the sequence threads' side: a sequence's eval calls this ---------------------------
    def __call__(self, view, tokens: list) -> int:
        seq = view.sequence
        last = -1
        for offset, chunk in chunks(tokens):
            rows = Rows(view.seq_id, view.n_tokens + offset, chunk, verify=view.verifying)
            with self.cv:
                if seq.error is not None:
                    raise seq.error
                seq.rows, seq.state = rows, "parked"
                self.cv.notify_all()
                while seq.rows is not None and seq.error is None:
                    seq.wake.wait()
                if seq.error is not None:
                    raise seq.error
            last = rows.first + len(rows.tokens) - 1
        return last

    def crowd(self) -> int:
        """Sequences decoding now (read without cv: a speculative drafter's estimate of
        how many rows a step has, edge_tune.llama.speculative)."""
        return len(self.live)

    # --- the decoding thread's side (holding cv unless said) ---------------------------------
    def free_slot(self, mix: tuple, key: tuple = ()) -> Slot | None:
        """A slot for a request under ``mix``, None when ``engine.parallel`` requests run.
        Of the idle slots, the ones that add the fewest filler rows to ``mix``'s steps (a
        step spans the consecutive sequence ids from its lowest to its highest, a filler in
        each gap: :mod:`edge_tune.llama.batch_rows`); among those, one whose cache was computed
        under ``mix``, for the request sharing the most leading items with ``key``
        (:func:`request_key`: the same conversation a turn earlier, or the same system
        prompt), then the most recent; else the least recently used (its cache is
        dropped)."""
        busy = [s for s in self.slots if s.sequence is not None]
        if len(busy) >= self.limit:
            return None
        idle = [s for s in self.slots if s.sequence is None]
        ids = [s.seq_id for s in busy if s.sequence.mix == mix]

        def gaps(slot: Slot) -> int:
            if not ids:
                return 0
            lo, hi = min(ids + [slot.seq_id]), max(ids + [slot.seq_id])
            return hi - lo - len(ids)

        fewest = min(gaps(s) for s in idle)
        idle = [s for s in idle if gaps(s) == fewest]
        shared = {s.seq_id: _shared_prefix(s.key, key) for s in idle if s.mix == mix}
        same = [s for s in idle if shared.get(s.seq_id, 0) > 0]
        if same:
            slot = max(same, key=lambda s: (shared[s.seq_id], s.used))
        else:  # the least recently used: the caches of recent conversations stay
            slot = min(idle, key=lambda s: s.used)
        if slot.mix != mix:
            slot.view.n_tokens, slot.mix = 0, mix  # its entries go at the first decode
        slot.key = key
        return slot

    def admit(self, job, mix: tuple, slot: Slot, run) -> Sequence:
        """Start ``run(sequence)`` on a thread of its own for ``job`` in ``slot``."""
        self._order += 1
        seq = Sequence(job, slot, mix, self._order, wake=threading.Condition(self.lock))
        slot.sequence = seq
        slot.view.sequence = seq
        self.live.append(seq)
        seq.thread = threading.Thread(target=run, args=(seq,), daemon=True,
                                      name=f"edge-tune-seq{slot.seq_id}")
        seq.thread.start()
        return seq

    def finished(self, seq: Sequence, ok: bool) -> None:
        """Called by the sequence's thread at its end (takes cv)."""
        with self.cv:
            seq.state = "done"
            slot = seq.slot
            slot.sequence, slot.used = None, self.steps
            if not ok:  # its tokens and KV entries may disagree: start that slot afresh
                slot.view.n_tokens, slot.mix = 0, None
            if seq in self.live:
                self.live.remove(seq)
            self.cv.notify_all()

    def drop_cancelled(self, stopping: bool) -> None:
        for seq in self.live:
            if seq.state == "parked" and (stopping or seq.job.cancelled.is_set()):
                seq.error = Cancelled("cancelled")
                seq.wake.notify_all()

    @property
    def sampling(self) -> bool:
        """Some sequence is still reading the last decode's logits."""
        return any(s.state == "running" for s in self.live)

    def pick(self) -> list[Sequence]:
        """The parked sequences of the next decode: the oldest prompt chunk, else a step
        of every parked sequence; of the current adapter set, or of
        the set whose oldest parked sequence waited longest when the current set has none
        or has had its turn (:data:`TURN_STEPS`) while another set waits. Switches the
        context's adapters when the set changes."""
        parked = [s for s in self.live if s.state == "parked" and s.error is None]
        if not parked:
            return []
        current = self.engine.active_mix
        mine = [s for s in parked if s.mix == current]
        others = [s for s in parked if s.mix != current]
        if not mine or (others and self.turn_steps >= TURN_STEPS):
            oldest = min(others, key=lambda s: s.order)
            self.engine.apply_mix(oldest.mix)
            self.switches += 1
            self.turn_steps = 0
            mine = [s for s in parked if s.mix == oldest.mix]
        mine.sort(key=lambda s: s.order)
        # a prompt chunk is decoded alone (batch_rows), before the step it joins; so is a
        # drafted token run (speculative decoding) unless a lone row computes as several
        together = self.engine.batch.lone_ok
        prompts = [s for s in mine if len(s.rows.tokens) > 1
                   and not (s.rows.verify and together)]
        return prompts[:1] or mine

    def decode(self, chosen: list[Sequence]) -> None:
        """One ``llama_decode`` for ``chosen`` (called WITHOUT cv: every other sequence is
        parked or fresh, so nothing else touches the context). When the KV buffer is full,
        idle slots' caches are dropped and the step retried once; a failure is handed to
        the sequences of the step."""
        entries = [s.rows for s in chosen]
        try:
            try:
                self.engine.batch.decode(entries)
            except KVFull:
                self.evict_idle()
                self.engine.batch.decode(entries)
        except EdgeTuneError as exc:
            for seq in chosen:
                seq.error = exc
        self.steps += 1
        self.turn_steps += 1

    def deliver(self, chosen: list[Sequence]) -> None:
        for seq in chosen:
            if seq.error is None:
                seq.rows, seq.state = None, "running"
            seq.wake.notify_all()

    def evict_idle(self) -> None:
        """Drop the caches of idle slots (their KV entries), oldest first."""
        for slot in sorted(self.slots, key=lambda s: s.used):
            if slot.sequence is None:
                self.engine.batch.drop(slot.seq_id)
                slot.view.n_tokens, slot.mix = 0, None

    def forget_all(self) -> None:
        """After an engine call that may have cleared the KV buffer (no sequence live)."""
        self.evict_idle()


def request_key(messages: list | None, prompt: str | None) -> tuple:
    """What a request asks, for matching it to a slot's cache: its messages as
    ``(role, content)`` items, or its prompt text."""
    if messages is not None:
        return tuple((str(m.get("role")), repr(m.get("content"))) for m in messages)
    return ("prompt", prompt or "")


def _shared_prefix(a: tuple, b: tuple) -> int:
    """Leading items ``a`` and ``b`` share; for two prompts, leading characters."""
    if a[:1] == ("prompt",) and b[:1] == ("prompt",):
        return len(os.path.commonprefix([a[1], b[1]]))
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
