"""The unsloth backend's DPO/ORPO on a CPU box: the mapping to TRL's ``DPOConfig`` /
``ORPOConfig`` (pure, no trl needed), edge-tune's pairs in the batch format of TRL's trainers,
TRL's losses against the CPU backend's on the same weights and batch, and the Trainer loop
(``fit``) with TRL's ``DPOTrainer`` for real on a tiny random Llama with PEFT (Unsloth itself
needs an NVIDIA GPU; its ``PatchDPOTrainer`` is applied only where Unsloth is loaded).

Tests that need trl skip where it is not installed (it comes with the ``cuda`` extra)."""

from __future__ import annotations

import math
import random

import pytest
from tests.helpers.unsloth_model import config, move_adapter, tiny_peft_llama, tiny_tokenizer

from edge_tune.training.backends import unsloth as uq
from edge_tune.data.preference import PairExample
from edge_tune.data.template import IGNORE
from edge_tune.errors import EdgeTuneError

NEEDS_TRL = "trl is not installed (the test and cuda extras bring it)"


def pairs(n: int = 6, seed: int = 0) -> list[PairExample]:
    """Pairs of token ids on a 64-word vocabulary: a random prompt (no loss), then a chosen
    and a rejected answer of different lengths."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(6, 12)
        prompt = [rng.randint(3, 63) for _ in range(k)]
        good, bad = [7, 8, 9, 10, 11, 2], [12, 13, 14, 2]
        out.append(PairExample(prompt + good, [IGNORE] * k + good, prompt + bad,
                               [IGNORE] * k + bad))
    return out


# --- pure mappings ------------------------------------------------------------------------------

def test_preference_args_are_the_sft_args_plus_the_methods(tmp_path):
    for method in ("dpo", "orpo"):
        cfg = config(method=method, beta=0.25, seq_len=384, batch_size=3, lr=2e-4,
                     lora_dropout=0.05)
        kw = uq.preference_args_kwargs(cfg, 40, str(tmp_path), "bf16")
        sft = uq.training_args_kwargs(cfg, 40, str(tmp_path), "bf16")
        assert {k: kw[k] for k in sft} == sft  # steps, batches, lr, AdamW, clipping, precision
        assert kw["beta"] == 0.25  # DPO's beta, ORPO's lambda: TRL calls both beta
        assert kw["max_length"] == 384 and kw["disable_dropout"] is False
        assert ("precompute_ref_log_probs" in kw) == (method == "dpo")
    with pytest.raises(EdgeTuneError, match="no TRL trainer for it"):
        uq.preference_args_kwargs(config(), 40, str(tmp_path), "bf16")


def test_trl_trainers_and_reward_logs():
    assert uq.TRL_TRAINERS["dpo"] == ("trl", "DPOConfig", "DPOTrainer")
    assert uq.TRL_TRAINERS["orpo"] == ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer")
    logs = {"loss": 0.6, "rewards/margins": 0.25, "rewards/accuracies": 0.75}
    assert uq.reward_fields(logs) == {"reward_margin": 0.25, "reward_accuracy": 0.75}
    assert uq.reward_fields({"loss": 0.6}) == {}


def test_pair_batch_marks_exactly_the_answer_tokens():
    batch = pairs(3)
    dpo = uq.pair_batch(batch, 0, "dpo", multiple=8)
    assert dpo["input_ids"].shape[0] == 6 and dpo["input_ids"].shape[1] % 8 == 0
    for row, ex in enumerate([p.chosen for p in batch] + [p.rejected for p in batch]):
        n = len(ex.input_ids)
        assert dpo["input_ids"][row, :n].tolist() == ex.input_ids  # chosen rows, then rejected
        assert dpo["completion_mask"][row].tolist() == [
            int(lab != IGNORE) for lab in ex.labels] + [0] * (dpo["input_ids"].shape[1] - n)
        assert int(dpo["attention_mask"][row].sum()) == n
    orpo = uq.pair_batch(batch, 0, "orpo")
    for side in ("chosen", "rejected"):
        for row, p in enumerate(batch):
            ex = getattr(p, side)
            n = len(ex.input_ids)
            assert orpo[f"{side}_labels"][row, :n].tolist() == ex.labels
            assert (orpo[f"{side}_labels"][row, n:] == IGNORE).all()
    assert uq.batch_tokens(dpo) == uq.batch_tokens(orpo) == sum(
        len(p.input_ids) + len(p.rejected_ids) for p in batch)


# --- with trl -----------------------------------------------------------------------------------

def test_the_mapping_builds_real_trl_configs(tmp_path):
    pytest.importorskip("trl", reason=NEEDS_TRL)
    from trl import DPOConfig
    from trl.experimental.orpo import ORPOConfig

    for method, cls in (("dpo", DPOConfig), ("orpo", ORPOConfig)):
        cfg = config(method=method, beta=0.2, seq_len=256, batch_size=2, grad_accum=3)
        args = cls(**uq.preference_args_kwargs(cfg, 30, str(tmp_path), "none"), use_cpu=True)
        assert args.beta == 0.2 and args.max_length == 256 and args.max_steps == 30
        assert args.per_device_train_batch_size == 2 and args.gradient_accumulation_steps == 3
        assert not args.disable_dropout and not args.remove_unused_columns
    dpo = DPOConfig(**uq.preference_args_kwargs(config(method="dpo"), 1, str(tmp_path), "none"),
                    use_cpu=True)
    assert list(dpo.loss_type) == ["sigmoid"]  # Rafailov et al. eq. 7, as the CPU backend


def _trainer(method: str, model, tmp_path):
    from datasets import Dataset

    args_class, trainer_class = uq.trl_trainer(method)
    cfg = config(method=method, beta=0.1, batch_size=3, max_steps=1)
    args = args_class(**uq.preference_args_kwargs(cfg, 1, str(tmp_path), "none"), use_cpu=True)
    return uq.pretokenized(trainer_class)(
        model=model, args=args, processing_class=tiny_tokenizer(),
        train_dataset=Dataset.from_dict({"pair": [0, 1, 2]}),
        data_collator=lambda b: uq.pair_batch(b, 0, method))


def test_trl_dpo_loss_equals_the_cpu_backends(tmp_path):
    pytest.importorskip("trl", reason=NEEDS_TRL)
    import torch

    from edge_tune.training.backends.cpu import pair_rows
    from edge_tune.training.preference_loss import pair_loss

    model = tiny_peft_llama()
    trainer = _trainer("dpo", model, tmp_path)  # its reference: the fresh adapter (B = 0)
    move_adapter(model)
    model.eval()
    batch = pairs(3)
    with torch.no_grad():
        got = float(trainer.compute_loss(model, uq.pair_batch(batch, 0, "dpo")))
        want = pair_loss(model, *pair_rows(batch, 0), "dpo", 0.1)
    assert abs(float(want.loss) - math.log(2)) > 1e-2  # the adapter moved the policy
    assert got == pytest.approx(float(want.loss), rel=1e-5)


def test_trl_orpo_loss_is_the_odds_ratio_term_plus_nll_of_the_whole_chosen_sequence(tmp_path):
    """TRL's ORPOTrainer takes its SFT term over prompt + answer; the CPU and mlx backends
    over the answer only (Hong et al. 2024, eq. 2). The odds-ratio term is the same."""
    pytest.importorskip("trl", reason=NEEDS_TRL)
    import torch
    import torch.nn.functional as F

    from edge_tune.training.backends.cpu import pair_rows
    from edge_tune.training.preference_loss import orpo_loss, sequence_logps

    model = tiny_peft_llama()
    trainer = _trainer("orpo", model, tmp_path)
    move_adapter(model)
    model.eval()
    batch = pairs(3)
    with torch.no_grad():
        got = float(trainer.compute_loss(model, uq.pair_batch(batch, 0, "orpo")))
        ids, labels, mask = pair_rows(batch, 0)
        sums, counts = sequence_logps(model, ids, labels, mask)
        means = sums / counts
        n = len(batch)
        logits = model(input_ids=ids[:n], attention_mask=mask[:n]).logits
        whole = ids[:n].masked_fill(mask[:n] == 0, IGNORE)  # every real token of the chosen rows
        nll_whole = F.cross_entropy(logits[:, :-1].flatten(0, 1), whole[:, 1:].flatten(),
                                    ignore_index=IGNORE)
        want = orpo_loss(means[:n], means[n:], nll_whole, 0.1)
    assert got == pytest.approx(float(want.loss), rel=1e-5)


def test_fit_trains_dpo_with_trls_trainer_on_cpu(tmp_path):
    pytest.importorskip("trl", reason=NEEDS_TRL)
    events = []
    data = pairs(6)
    job = {"config": config(method="dpo", beta=0.1, batch_size=3, max_steps=6, lr=2e-2,
                            eval_every=3),
           "examples": data, "val_examples": data[:2], "pad_id": 0}
    model = tiny_peft_llama()
    result = uq.fit(model, job, events.append, "none", tokenizer=tiny_tokenizer())
    train = [e for e in events if getattr(e, "split", None) == "train"]
    vals = [e for e in events if getattr(e, "split", None) == "val"]
    assert [m.step for m in train] == list(range(1, 7)) and [m.step for m in vals] == [3, 6]
    # the adapter starts as the reference: loss log 2, margin 0; then the margin grows
    assert train[0].loss == pytest.approx(math.log(2), abs=1e-5)
    assert train[0].reward_margin == pytest.approx(0, abs=1e-6)
    assert train[-1].loss < train[0].loss and train[-1].reward_margin > 0
    assert vals[-1].reward_margin > vals[0].reward_margin > 0
    assert vals[-1].reward_accuracy == 1.0
    # tokens: both sides of every pair, each step sees three pairs
    assert result.tokens == sum(len(p.input_ids) + len(p.rejected_ids) for p in data) * 3
    # TRL's reference copy is frozen, and not counted as trained
    ref = [p for n, p in model.named_parameters() if ".ref." in n]
    assert ref and not any(p.requires_grad for p in ref)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".default." in n)
    assert result.trainable_parameters == lora
    # what train() saves: the trained adapter alone, as for SFT (no "ref/" beside it)
    model.save_pretrained(str(tmp_path / "adapter"), safe_serialization=True,
                          selected_adapters=["default"])
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
