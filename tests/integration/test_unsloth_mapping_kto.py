"""The unsloth backend's KTO on a CPU box, as its DPO mapping is checked
(test_unsloth_mapping_preference.py): the mapping to TRL's ``KTOConfig``, edge-tune's KTO
examples in the batch format of TRL's ``KTOTrainer`` (with TRL's mismatched KL rows), TRL's
loss against the CPU backend's on the same weights and batch, and a few Trainer steps with
``KTOTrainer`` for real on a tiny random Llama with PEFT."""

from __future__ import annotations

import math
import random

import pytest
from tests.helpers.unsloth_model import config, move_adapter, tiny_peft_llama, tiny_tokenizer

from edge_tune.data.preference import KTOExample, kto_rows
from edge_tune.data.template import IGNORE
from edge_tune.training.backends import unsloth as uq

NEEDS_TRL = "trl is not installed (the test and cuda extras bring it)"


def examples(n: int = 6, seed: int = 0) -> list[KTOExample]:
    """Unpaired answers on a 64-word vocabulary: a random prompt (no loss), then a good or a
    bad answer, alternately desirable and not."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(6, 12)
        prompt = [rng.randint(3, 63) for _ in range(k)]
        answer = [7, 8, 9, 10, 11, 2] if i % 2 == 0 else [12, 13, 14, 2]
        out.append(KTOExample(prompt + answer, [IGNORE] * k + answer, i % 2 == 0, k))
    return out


def test_kto_args_map_to_trls_names(tmp_path):
    cfg = config(method="kto", beta=0.25, seq_len=384, batch_size=3, desirable_weight=1.5,
                 undesirable_weight=0.5)
    kw = uq.preference_args_kwargs(cfg, 40, str(tmp_path), "bf16")
    sft = uq.training_args_kwargs(cfg, 40, str(tmp_path), "bf16")
    assert {k: kw[k] for k in sft} == sft
    assert (kw["beta"], kw["desirable_weight"], kw["undesirable_weight"]) == (0.25, 1.5, 0.5)
    assert kw["loss_type"] == "kto" and kw["max_length"] == 384
    assert kw["precompute_ref_log_probs"] is False
    assert uq.TRL_TRAINERS["kto"] == ("trl", "KTOConfig", "KTOTrainer")


def test_kto_batch_holds_trls_kl_rows():
    batch = examples(3)
    out = uq.pair_batch(batch, 0, "kto", multiple=8)
    assert out["label"].tolist() == [True, False, True]
    for i, ex in enumerate(batch):
        n = len(ex.input_ids)
        assert out["input_ids"][i, :n].tolist() == ex.input_ids
        assert out["completion_mask"][i].sum() == len(ex.input_ids) - ex.prompt_len
        # TRL: KL_completion_ids = [completion_ids[-1]] + completion_ids[:-1]
        other = batch[i - 1]
        kl = ex.input_ids[:ex.prompt_len] + other.input_ids[other.prompt_len:]
        assert out["KL_input_ids"][i, :len(kl)].tolist() == kl
        assert int(out["KL_attention_mask"][i].sum()) == len(kl)
        assert out["KL_completion_mask"][i, :len(kl)].tolist() == \
            [0] * ex.prompt_len + [1] * (len(kl) - ex.prompt_len)
    cut = kto_rows(batch, limit=10)
    assert len(cut) == 6 and all(len(r.input_ids) <= 10 for r in cut[3:])  # the KL rows


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.5)])
def test_trl_kto_loss_equals_the_cpu_backends(tmp_path, weights):
    pytest.importorskip("trl", reason=NEEDS_TRL)
    import torch
    from datasets import Dataset

    from edge_tune.training.job import as_config
    from edge_tune.training.backends.cpu import pair_rows
    from edge_tune.training.preference_loss import kto_terms, pair_loss

    model = tiny_peft_llama()
    cfg = config(method="kto", beta=0.1, batch_size=3, max_steps=1, desirable_weight=weights[0],
                 undesirable_weight=weights[1])
    args_class, trainer_class = uq.trl_trainer("kto")
    args = args_class(**uq.preference_args_kwargs(cfg, 1, str(tmp_path), "none"), use_cpu=True)
    trainer = uq.pretokenized(trainer_class)(
        model=model, args=args, processing_class=tiny_tokenizer(),
        train_dataset=Dataset.from_dict({"pair": [0, 1, 2]}),
        data_collator=lambda b: uq.pair_batch(b, 0, "kto"))
    move_adapter(model)  # the policy moves; the reference stays the fresh adapter (B = 0)
    model.eval()
    batch = examples(4)
    with torch.no_grad():
        got = float(trainer.compute_loss(model, uq.pair_batch(batch, 0, "kto")))
        want = pair_loss(model, *pair_rows(batch, 0), "kto", 0.1,
                         kto_terms(batch, as_config(cfg)))
    assert abs(float(want.loss) - 0.5) > 1e-3  # the adapter moved the policy
    assert got == pytest.approx(float(want.loss), rel=1e-5)
    assert math.isfinite(want.kl) and want.kl >= 0


def test_fit_trains_kto_with_trls_trainer_on_cpu():
    pytest.importorskip("trl", reason=NEEDS_TRL)
    events = []
    data = examples(6)
    job = {"config": config(method="kto", beta=0.1, batch_size=3, max_steps=4, lr=2e-2,
                            eval_every=4),
           "examples": data, "val_examples": data[:3], "pad_id": 0}
    result = uq.fit(tiny_peft_llama(), job, events.append, "none", tokenizer=tiny_tokenizer())
    train = [e for e in events if getattr(e, "split", None) == "train"]
    vals = [e for e in events if getattr(e, "split", None) == "val"]
    assert [m.step for m in train] == [1, 2, 3, 4] and [m.step for m in vals] == [4]
    # the adapter starts as the reference: every answer's loss 1 − σ(0) = 0.5
    assert train[0].loss == pytest.approx(0.5, abs=1e-5)
    assert train[-1].loss < train[0].loss and vals[-1].reward_margin > 0
    assert result.steps == 4
