"""The validation split: which records training holds back (and verify reads back)."""

from __future__ import annotations

from typing import Optional

from edge_tune.errors import UsageError


def split_validation(records: list, share: float, seed: int,
                     val: Optional[list] = None) -> tuple[list, list]:
    """(train, validation) records: a given validation set, or a seeded random share. Pure.
    Raises EdgeTuneError when the share leaves no training record."""
    import random

    if val is not None or not share:
        return records, val or []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(records) * share))
    if n_val >= len(records):
        raise UsageError("leaves no training records out of "
                         f"{len(records)}", setting="val_split", value=share)
    held = set(order[:n_val])
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])
