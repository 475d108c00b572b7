"""The per-slot data order (edge_tune.data.sharding): pure, no torch."""

from __future__ import annotations

import random

import pytest

from edge_tune.training.backends.cpu import length_grouped_batches
from edge_tune.data import sharding


def _orders(n: int, accum: int, world: int, batch: int = 2, seed: int = 7) -> dict:
    """slot -> (record indices of its members, SlotOrder), built as each rank builds them."""
    rng = random.Random(0)
    lengths = {i: rng.randint(5, 90) for i in range(n)}
    slots, out = accum * world, {}
    for rank in range(world):
        owned = sharding.rank_slots(rank, accum)
        mine = sharding.shard(range(n), slots, owned)  # what this rank reads
        for slot in owned:
            members = [i for i in mine if sharding.slot_of(i, slots) == slot]
            out[slot] = (members, sharding.SlotOrder([lengths[i] for i in members], batch, seed,
                                                     slot, length_grouped_batches))
    return out


def _step(orders: dict, step: int) -> list[list[int]]:
    return [[members[k] for k in order.batch(step)] for members, order in
            (orders[s] for s in sorted(orders))]


def test_ranks_read_disjoint_shards_that_cover_the_data():
    n, accum, world = 53, 2, 3
    shards = [sharding.shard(range(n), accum * world, sharding.rank_slots(r, accum))
              for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert all(abs(len(s) - n / world) <= accum for s in shards)


@pytest.mark.parametrize("accum,world", [(2, 1), (1, 2)])
def test_the_global_batch_does_not_depend_on_the_number_of_processes(accum, world):
    """Two slots per step: one process with two micro-batches, or two with one each, train on
    the same examples at every step."""
    ref = _orders(41, 2, 1)
    got = _orders(41, accum, world)
    for step in range(30):  # several epochs of each slot
        assert _step(got, step) == _step(ref, step)


def test_each_slot_covers_its_shard_once_per_epoch_in_a_new_order():
    members, order = _orders(40, 1, 2, batch=4)[1]
    per_epoch = -(-len(members) // 4)
    epochs = [sorted(i for step in range(e * per_epoch, (e + 1) * per_epoch)
                     for i in order.batch(step)) for e in range(3)]
    assert epochs[0] == epochs[1] == epochs[2] == list(range(len(members)))
    first = [order.batch(s) for s in range(per_epoch)]
    second = [order.batch(s) for s in range(per_epoch, 2 * per_epoch)]
    assert first != second


def test_the_order_is_a_pure_function_of_seed_slot_and_step():
    """What lets a checkpoint resume from its step number alone."""
    a = _orders(30, 1, 2)[1][1]
    b = _orders(30, 1, 2)[1][1]
    assert a.batch(17) == b.batch(17)  # b never saw steps 0..16
    assert [a.batch(s) for s in range(20)] != [_orders(30, 1, 2, seed=8)[1][1].batch(s)
                                                for s in range(20)]


def test_steps_per_epoch():
    assert sharding.steps_per_epoch(180, 4, 2) == 23
    assert sharding.steps_per_epoch(3, 4, 2) == 1
