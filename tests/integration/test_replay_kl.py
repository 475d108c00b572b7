"""`train --replay N --replay-kl W`: the KL-to-base term on the replay records (cpu backend,
edge_tune/training/backends/cpu.py), on a tiny model, and its flag's validation. What it buys on a
narrow task is a benchmark (benchmarks/forgetting.py, docs/eval.md), not a test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.cli import assert_one_line_error, run_cli_in_process


def _batch(hf_dir: Path):
    """Two conversations (the second one marked replay) collated, and the KL labels."""
    from transformers import AutoTokenizer

    from edge_tune.training.backends import cpu
    from edge_tune.data.template import encode

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    batch = [encode(tok, [{"role": "user", "content": "Ticket 7: my order is late."},
                          {"role": "assistant", "content": '{"category": "shipping"}'}]),
             encode(tok, [{"role": "user", "content": "Name a colour of the sea."},
                          {"role": "assistant", "content": "The sea is often blue."}])]
    ids, labels, mask = cpu.collate(batch, tok.eos_token_id)
    kl_labels = cpu.collate(cpu.replay_labels(batch, [False, True]), tok.eos_token_id)[1]
    return ids, labels, mask, kl_labels


def test_kl_to_base_is_zero_untrained_positive_after_a_step_and_trains_lora_only(tiny_hf):
    import torch

    from edge_tune.training.backends import cpu
    from edge_tune.data.template import IGNORE

    torch.manual_seed(0)
    model = cpu.build_model(tiny_hf, dict(rank=4, alpha=8, target_modules=["q_proj", "v_proj",
                                                                           "down_proj"]),
                            bf16=False)
    ids, labels, mask, kl_labels = _batch(tiny_hf)
    assert (kl_labels[0] == IGNORE).all() and (kl_labels[1] != IGNORE).any()

    def kl() -> torch.Tensor:
        states = cpu.causal_lm_of(model).model(input_ids=ids, attention_mask=mask)
        return cpu.replay_kl_sum(model, states.last_hidden_state, ids, mask, None, kl_labels)

    with torch.no_grad():  # LoRA's B starts at zero: the tuned model is the base
        assert kl().item() == pytest.approx(0.0, abs=1e-6)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.SGD(lora, lr=1.0)
    cpu.response_loss(model, ids, labels, mask, None, kl_labels, 1.0).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

    after = kl()
    assert after.item() > 1e-6  # the step on the task moved the replay answer's distribution
    with torch.no_grad(), model.disable_adapter():  # the adapter off: the base again
        assert kl().item() == pytest.approx(0.0, abs=1e-6)
    after.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)  # the base stays frozen
    assert any(g.abs().sum() > 0 for g in grads.values())
    # The term adds kl_weight x KL per trained token to the cross-entropy
    n = int((labels[:, 1:] != IGNORE).sum())
    with torch.no_grad():
        plain = cpu.response_loss(model, ids, labels, mask).item()
        weighted = cpu.response_loss(model, ids, labels, mask, None, kl_labels, 2.0).item()
        assert weighted == pytest.approx(plain + 2.0 * kl().item() / n, rel=1e-4)


def _data(tmp_path: Path) -> str:
    path = tmp_path / "narrow.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Ticket 1"},
                                             {"role": "assistant", "content": "{}"}]}) + "\n")
    return str(path)


def test_bad_replay_kl_values_are_one_line_errors(tmp_path):
    data = _data(tmp_path)
    assert_one_line_error(run_cli_in_process("train", "--data", data, "--replay", "40",
                                             "--replay-kl", "-1"), "replay_kl: -1", "0 to 100")
    assert_one_line_error(run_cli_in_process("train", "--data", data, "--replay", "40",
                                             "--replay-kl", "nan"), "replay_kl: nan")
    assert_one_line_error(run_cli_in_process("train", "--data", data, "--replay-kl", "1"),
                          "--replay-kl 1", "--replay N")
    assert_one_line_error(run_cli_in_process("train", "--data", data, "--replay", "40",
                                             "--replay-kl", "1", "--full"), "--replay-kl",
                          "--full")
    assert_one_line_error(run_cli_in_process("train", "--data", data, "--replay", "40",
                                             "--replay-kl", "1", "--backend", "mlx"),
                          "--replay-kl")
    toml = tmp_path / "run.toml"
    toml.write_text(f'data = "{data}"\nreplay = 40\nreplay_kl = "strong"\n')
    assert_one_line_error(run_cli_in_process("train", "--config", str(toml)), "replay_kl")
