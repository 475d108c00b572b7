"""Packing: rows of several examples with attention kept inside each example."""

from __future__ import annotations

import pytest

from edge_tune.training.backends.cpu import pack_rows


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([5, 3, 8, 2, 4], capacity=10)
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 8, 2, 4][i] for i in row) <= 10 for row in rows)
    assert len(rows) == 3  # 22 tokens in rows of 10
    assert pack_rows([12, 3], capacity=10) == [[0], [1]]  # too long: a row of its own


def test_packed_loss_equals_examples_one_by_one(hf_dir, demo_jsonl):
    import torch
    from transformers import AutoTokenizer

    from edge_tune.training.backends import cpu
    from edge_tune.data.formats import read_jsonl
    from edge_tune.data.template import IGNORE, encode

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    batch = [encode(tok, r.messages) for r in read_jsonl(demo_jsonl)[:6]]
    model = cpu.build_model(hf_dir, dict(rank=8, alpha=16, target_modules=["q_proj", "v_proj"]),
                            bf16=False)
    with torch.no_grad():
        ids, labels, mask, positions, n = cpu.collate_packed(batch, tok.eos_token_id, 512)
        assert ids.shape[0] == 1 and n == sum(len(e.input_ids) for e in batch)
        packed = cpu.response_loss(model, ids, labels, mask, positions).item()
        total = count = 0
        for e in batch:
            i, lab, m = cpu.collate([e], tok.eos_token_id)
            k = int((lab[:, 1:] != IGNORE).sum())
            total += cpu.response_loss(model, i, lab, m).item() * k
            count += k
    assert packed == pytest.approx(total / count, rel=1e-5)


def test_pack_rows_spreads_examples_evenly():
    # Eight 72-token examples need two rows of 512; FFD alone would make one row of 504 and one
    # of 72, so the batch would be 512 wide with half of it padding.
    rows = pack_rows([72] * 8, capacity=512)
    assert sorted(len(r) for r in rows) == [4, 4]


@pytest.mark.parametrize("seed", range(50))
def test_pack_rows_never_overfills(seed):
    import random

    rng = random.Random(seed)
    lengths = [rng.randint(1, 600) for _ in range(rng.randint(1, 30))]
    rows = pack_rows(lengths, capacity=512)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 or len(row) == 1 for row in rows)
