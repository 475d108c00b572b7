"""Which examples each optimizer step trains on, split into the step's micro-batch *slots*.

A step of the cpu backend takes ``slots = grad_accum × world_size`` micro-batches. Record ``i``
(in the training file's order, after the validation split) belongs to slot ``i % slots``, and
rank ``r`` owns slots ``r·accum … r·accum + accum − 1``. So

- a rank reads and tokenizes only its shard (the records of its slots), never all the data;
- the order is a pure function of (seed, slot, step): a run with the same global batch trains
  on the same examples at every step whatever the number of processes (one process with
  ``--grad-accum 2`` == two processes without), and a checkpoint needs only the step number
  to resume, with any split of the same slots over processes.

Each slot goes through its shard epoch after epoch, each epoch length-grouped (little padding)
and shuffled with a seed derived from (seed, slot, epoch). Pure: no I/O, no torch.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence


def slot_of(index: int, slots: int) -> int:
    return index % slots


def rank_slots(rank: int, accum: int) -> range:
    """The slots rank ``rank`` trains (``accum`` micro-batches per step)."""
    return range(rank * accum, (rank + 1) * accum)


def shard(indices: Sequence[int], slots: int, owned: range) -> list[int]:
    """The record indices of ``indices`` that fall in the ``owned`` slots."""
    return [i for i in indices if slot_of(i, slots) in owned]


class SlotOrder:
    """The micro-batches of one slot, step by step: ``batch(step)`` -> example positions in
    the slot's list. Epochs are generated as far as needed (cheap: lengths only)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, slot: int,
                 group: Callable[[list[int], int, random.Random], list[list[int]]]):
        if not lengths:
            raise ValueError(f"slot {slot} has no examples")
        self.lengths, self.batch_size, self.seed, self.slot = list(lengths), batch_size, seed, slot
        self.group = group
        self.batches: list[list[int]] = []
        self.epochs = 0

    def batch(self, step: int) -> list[int]:
        while len(self.batches) <= step:
            rng = random.Random(f"edge-tune/{self.seed}/{self.slot}/{self.epochs}")
            self.batches += self.group(self.lengths, self.batch_size, rng)
            self.epochs += 1
        return self.batches[step]


def steps_per_epoch(examples: int, batch_size: int, slots: int) -> int:
    """Optimizer steps for one pass over ``examples`` (all slots together)."""
    return max(1, -(-examples // (batch_size * slots)))
