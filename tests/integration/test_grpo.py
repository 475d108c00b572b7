"""``train --method grpo`` end to end on the tiny random Llama: llama.cpp samples the rollouts
with the adapter of each step, torch + PEFT updates it, and a trivially learnable reward goes
up on held-out prompts, measured by ``eval`` in llama.cpp.

The reward: the answer does not start with the base's greedy first token (a regex). A random
model's outputs barely depend on the prompt and its embeddings have no structure, so a reward
about a class of tokens (say, "starts with a letter") is not learnable by a LoRA in a few
steps; pushing one token down is, and the base answers it greedily on most prompts while
sampling other tokens often."""

from __future__ import annotations

import json

import pytest

from edge_tune import api, config
from edge_tune.errors import UsageError
from edge_tune.events import Metric


@pytest.fixture(autouse=True)
def one_llama_thread(monkeypatch):
    monkeypatch.setenv("EDGE_TUNE_THREADS", "1")  # shared machine: see edge_tune.llama.engine


def _prompts(path, n, offset=0):
    with open(path, "w") as f:
        for i in range(offset, offset + n):
            f.write(json.dumps({"prompt": f"Say something about {i}.", "answer": str(i),
                                "id": i}) + "\n")
    return path


def _greedy_word(tiny, numbers) -> str:
    """The base's commonest greedy first token, as text, after the prompts of ``numbers``."""
    from collections import Counter

    from transformers import AutoTokenizer

    from edge_tune import models
    from edge_tune.llama.rollout import Rollouts

    tok = AutoTokenizer.from_pretrained(models.dequantized_copy(tiny))
    ids = [list(tok.apply_chat_template([{"role": "user", "content": f"Say something about {i}."}],
                                        add_generation_prompt=True, tokenize=True,
                                        return_dict=False)) for i in numbers]
    with Rollouts(tiny, n_ctx=128, parallel=len(ids)) as roll:
        words = Counter(tok.decode(s.ids) for s in roll.sample(ids, 1, 1, 0.0, set()))
    return words.most_common(1)[0][0]


def test_grpo_tiny_reward_goes_up(tiny, tmp_path):
    import re

    data = _prompts(tmp_path / "train.jsonl", 24)
    val = _prompts(tmp_path / "val.jsonl", 16, offset=100)
    reward = f"regex:^(?!{re.escape(_greedy_word(tiny, range(100, 116)))})"
    cfg = config.build(model=str(tiny), data=str(data), val=str(val), method="grpo",
                       reward=[reward], max_completion_length=2, num_generations=8,
                       batch_size=16, max_steps=8, lr=1e-2, beta=0.0, seq_len=64,
                       verify=False, backend="cpu", out=str(tmp_path / "run"),
                       report_to="none")
    events = []
    api.train(cfg, on_event=events.append)
    steps = [e for e in events if isinstance(e, Metric) and e.split == "train"]
    assert len(steps) == 8
    for m in steps:
        assert {"reward", "reward_std", f"reward/{reward}", "kl", "completion_length",
                "clip_ratio", "is_ratio_mean", "is_ratio_max"} <= set(m.rl)
        # llama.cpp samples with the adapter the trainer has: the ratio stays near 1
        assert 0.9 < m.rl["is_ratio_mean"] < 1.1
    assert any("columns handed to the rewards: answer (24), id (24)" in getattr(e, "message", "")
               for e in events)
    report = api.evaluate(tmp_path / "run", max_tokens=2, n_prompts=16).to_dict()
    base, tuned = report["rewards"]["base"]["reward"], report["rewards"]["tuned"]["reward"]
    assert steps[-1].rl["reward"] >= steps[0].rl["reward"]
    assert tuned > base + 0.25, report["rewards"]


@pytest.mark.parametrize("flags,needle", [
    (dict(method="grpo"), "needs at least one --reward"),
    (dict(method="grpo", reward=["json"], batch_size=6), "multiple of it"),
    (dict(reward=["json"]), "reward functions are GRPO's"),
    (dict(method="grpo", reward=["json"], full=True), "not with --full"),
])
def test_grpo_settings_refused_in_one_line(flags, needle):
    with pytest.raises(UsageError, match=needle):
        config.build(data="x.jsonl", **flags)


def test_grpo_without_signal_says_it_learnt_nothing(tiny, tmp_path):
    """A reward no completion earns gives every group equal rewards: zero advantages, so
    each step moves nothing. The run says so per step (the share of such groups, a warning),
    at its end, and verify reports the adapter as having no effect, not just "ok"."""
    from edge_tune.events import Log

    cfg = config.build(model=str(tiny), data=str(_prompts(tmp_path / "train.jsonl", 8)),
                       method="grpo", reward=["regex:(?!)"], max_completion_length=2,
                       num_generations=4, batch_size=8, max_steps=3, beta=0.0, seq_len=64,
                       backend="cpu", out=str(tmp_path / "run"), report_to="none")
    events = []
    api.train(cfg, on_event=events.append)
    steps = [e for e in events if isinstance(e, Metric) and e.split == "train"]
    assert [m.rl["frac_reward_zero_std"] for m in steps] == [1.0, 1.0, 1.0]
    warnings = [e.message for e in events if isinstance(e, Log) and e.level == "warning"]
    assert sum("no learning signal" in w for w in warnings) == 3, warnings
    assert any(w.startswith("GRPO learnt nothing in 3 of 3 steps") for w in warnings), warnings
    assert any(w.startswith("verify: the adapter has no effect") for w in warnings), warnings
