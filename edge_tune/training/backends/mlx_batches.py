"""Batches of edge-tune's tokenized examples as the arrays the mlx backend trains on (SFT in
:mod:`edge_tune.training.backends.mlx`, DPO/ORPO in
:mod:`edge_tune.training.backends.mlx_preference`).

``tokens`` (rows, width) int32, right-padded with ``pad_id``; ``mask`` (rows, width − 1)
float32, 1 where the next token is trained (``labels[t + 1] != IGNORE``, exactly the CPU
backend's loss). Widths are rounded up to ``PAD_TO`` (at most the run's ``--seq-len``) so
``mx.compile`` sees few distinct shapes, as mlx-lm's own batches do. Pure (numpy imported
inside)."""

from __future__ import annotations

import math

from edge_tune.data.template import IGNORE, Example

PAD_TO = 32


def padded_width(longest: int, limit: int) -> int:
    return min(limit, PAD_TO * math.ceil(longest / PAD_TO))


def batch_arrays(examples: list[Example], pad_id: int, limit: int):
    """(tokens, mask) numpy arrays of ``examples``, one row each."""
    import numpy as np

    width = padded_width(max(len(e.input_ids) for e in examples), limit)
    tokens = np.full((len(examples), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(examples), width - 1), dtype=np.float32)
    for i, e in enumerate(examples):
        n = min(len(e.input_ids), width)
        tokens[i, :n] = e.input_ids[:n]
        mask[i, : n - 1] = [lab != IGNORE for lab in e.labels[1:n]]
    return tokens, mask


def pair_rows(pairs: list, limit: int) -> list[Example]:
    """The 2n rows of a batch of ``PairExample`` (chosen, then rejected) or of ``KTOExample``
    (the examples, then their KL rows: ``preference.kto_rows``)."""
    from edge_tune.data.preference import KTOExample, kto_rows

    if pairs and isinstance(pairs[0], KTOExample):
        return kto_rows(pairs, limit)
    return [p.chosen for p in pairs] + [p.rejected for p in pairs]


def pair_arrays(pairs: list, pad_id: int, limit: int):
    """(tokens, mask) of a batch of ``PairExample``: the chosen sequences, then the rejected
    ones, padded together (2n rows); of ``KTOExample``: the examples, then their KL rows."""
    return batch_arrays(pair_rows(pairs, limit), pad_id, limit)
