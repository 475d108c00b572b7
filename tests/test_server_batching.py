"""The serving engine's prompt cache and adapter sets, on a tiny random model (hidden 64).

The project's guarantee: a greedy answer equals a fresh-context answer (`chat --prompt`) token
for token, whatever was asked before and under whichever adapters. These tests compare a
warm engine (prompt cache on, adapter sets switched back and forth) with a cold one (context
reset before every answer), and count the prompt tokens evaluated, not wall time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from gguf_helpers import write_adapter  # noqa: E402
from tiny_models import tiny_llama_gguf  # noqa: E402

CONVERSATION = ["What is the capital of France?", "And of Italy?", "Which one is older?",
                "Say it in one word."]
MIXES = [(), (("a", 1.0),), (("b", 1.0),), (("a", 0.7), ("b", 0.3))]


def _tiny_adapter(path: Path, seed: int) -> Path:
    """A random r=4 LoRA on every block's q and ffn_up: strong enough to change answers."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for b in range(2):
        tensors[f"blk.{b}.attn_q.weight.lora_a"] = rng.normal(size=(4, 64)) * 0.3
        tensors[f"blk.{b}.attn_q.weight.lora_b"] = rng.normal(size=(64, 4)) * 0.3
        tensors[f"blk.{b}.ffn_up.weight.lora_a"] = rng.normal(size=(4, 64)) * 0.3
        tensors[f"blk.{b}.ffn_up.weight.lora_b"] = rng.normal(size=(128, 4)) * 0.3
    return write_adapter(path, "llama", tensors, alpha=4.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_gguf):
    root = tmp_path_factory.mktemp("batching")
    base = tiny_llama_gguf(root / "tiny.gguf", default_gguf)
    return {"base": base, "a": _tiny_adapter(root / "a.gguf", 1),
            "b": _tiny_adapter(root / "b.gguf", 2)}


def _engine(tiny, **kw):
    from edge_tune.engine import Engine

    engine = Engine(tiny["base"], n_ctx=1024, threads=1, **kw)
    engine.add_adapter(tiny["a"], "a")
    engine.add_adapter(tiny["b"], "b")
    return engine


def _answer(engine, mix, messages):
    engine.activate_mix(mix)
    pieces = list(engine.generate(messages=messages, temperature=0, max_tokens=16))
    return "".join(p.text for p in pieces), pieces[-1]


def test_prompt_cache_reuses_the_prefix_per_adapter_set_and_changes_no_answer(tiny):
    """Four conversations, one per adapter set (base, a, b, a 0.7 + b 0.3), asked turn by turn
    in turns: every answer equals the cold engine's, the four sets answer differently, and
    from turn 2 on each set's previous prompt comes from its cache (saved and restored
    across the switches), so only the new tokens are evaluated."""
    warm, cold = _engine(tiny), _engine(tiny, prompt_cache=False)
    try:
        history = {mix: [] for mix in MIXES}
        last_prompt = {mix: 0 for mix in MIXES}
        for question in CONVERSATION:
            answers = set()
            for mix in MIXES:
                messages = history[mix] + [{"role": "user", "content": question}]
                got, last = _answer(warm, mix, messages)
                want, _ = _answer(cold, mix, messages)
                assert got == want, (mix, question)
                assert last.cached_tokens == last_prompt[mix], (mix, question)
                last_prompt[mix] = last.prompt_tokens
                history[mix] = messages + [{"role": "assistant", "content": got}]
                answers.add(got)
            assert len(answers) == len(MIXES), answers  # a cache of another set would show
    finally:
        warm.close()
        cold.close()


def test_the_same_prompt_twice_is_served_from_the_cache(tiny):
    engine = _engine(tiny)
    try:
        messages = [{"role": "user", "content": CONVERSATION[0]}]
        first, one = _answer(engine, (), messages)
        again, two = _answer(engine, (), messages)
        assert again == first
        assert one.cached_tokens == 0 and two.cached_tokens == two.prompt_tokens - 2
    finally:
        engine.close()


def test_a_removed_adapter_takes_its_cache_along(tiny):
    from edge_tune.errors import EdgeTuneError

    engine = _engine(tiny)
    try:
        messages = [{"role": "user", "content": CONVERSATION[0]}]
        _answer(engine, (("a", 1.0),), messages)
        with pytest.raises(EdgeTuneError, match="active"):
            engine.remove_adapter("a")
        _answer(engine, (), messages)
        engine.remove_adapter("a")
        with pytest.raises(EdgeTuneError, match="not loaded"):
            engine.activate_mix((("a", 1.0),))
        assert not any(name == "a" for key in engine._saved for name, _ in key)
    finally:
        engine.close()
