"""The batching rule of edge_tune.llama.batch_rows, checked bit for bit on the default model.

What the server's exactness and prompt cache rest on: a decoded row's logits (and so its KV
entries) equal the same token's inside a prompt block, however the prompt is split, and a
sequence's step gives the same logits alone (with its filler row) as beside another
sequence (with a gap of sequence ids between: a filler row without logits). Measured with and without an adapter (F32 matrices take other kernels for one row
than for two), past 512 cells of context (where ggml's flash attention would switch to a
split kernel for an F16 cache), real weights (Q4_1 blocks, Q8_0 output).
"""

from __future__ import annotations


import numpy as np
import pytest

from tests.helpers.gguf_helpers import write_adapter  # noqa: E402

ANSWER = 12  # decoded tokens per check


@pytest.fixture(scope="module")
def engine(default_gguf, tmp_path_factory):
    from edge_tune.llama.engine import Engine

    rng = np.random.default_rng(7)
    tensors = {}
    for b in range(30):  # every block's q and ffn_up: a random r=8 LoRA with F32 matrices
        tensors[f"blk.{b}.attn_q.weight.lora_a"] = rng.normal(size=(8, 576)) * 0.05
        tensors[f"blk.{b}.attn_q.weight.lora_b"] = rng.normal(size=(576, 8)) * 0.05
        tensors[f"blk.{b}.ffn_up.weight.lora_a"] = rng.normal(size=(8, 576)) * 0.05
        tensors[f"blk.{b}.ffn_up.weight.lora_b"] = rng.normal(size=(1536, 8)) * 0.05
    adapter = write_adapter(tmp_path_factory.mktemp("rule") / "r.gguf", "llama", tensors,
                            alpha=8.0)
    eng = Engine(default_gguf, n_ctx=1024, threads=2, parallel=2)
    eng.add_adapter(adapter, "r")
    yield eng
    eng.close()


def _logits(eng, row: int) -> np.ndarray:
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(eng.llm.ctx, row)
    return np.ctypeslib.as_array(ptr, shape=(eng.n_vocab,)).copy()


def _clear(eng) -> None:
    import llama_cpp

    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(eng.llm.ctx), True)


def _blocks(eng, seq: int, tokens: list, sizes: list) -> list:
    """Evaluate ``tokens`` as prompt blocks of the given sizes (cycled): every row's logits."""
    from edge_tune.llama.batch_rows import Rows

    out, i, k = [], 0, 0
    while i < len(tokens):
        rows = Rows(seq, i, tokens[i:i + sizes[k % len(sizes)]], all_logits=True)
        eng.llm.batch.decode([rows])
        out += [_logits(eng, rows.first + j) for j in range(len(rows.tokens))]
        i, k = i + len(rows.tokens), k + 1
    return out


def _greedy(eng, prompts: dict) -> dict:
    """Decode ANSWER greedy tokens for every sequence in ``prompts`` ({seq: tokens}) in steps
    of all of them: {seq: (answer tokens, logits before each token)}."""
    from edge_tune.llama.batch_rows import Rows

    last = {s: _blocks(eng, s, p, [300])[-1] for s, p in prompts.items()}
    out = {s: ([], []) for s in prompts}
    for t in range(ANSWER):
        entries = []
        for s in sorted(prompts):
            token = int(np.argmax(last[s]))
            out[s][0].append(token)
            out[s][1].append(last[s])
            entries.append(Rows(s, len(prompts[s]) + t, [token]))
        eng.llm.batch.decode(entries)
        last = {e.seq: _logits(eng, e.first) for e in entries}
    return out


@pytest.mark.parametrize("mix, facts", [((), 4), ((("r", 1.0),), 48)],
                         ids=["base", "adapter-past-512-cells"])
def test_decoded_rows_equal_block_rows_alone_or_batched(engine, mix, facts):
    engine.apply_mix(mix)
    text = " ".join(f"Fact {i}: river {i} runs to the sea." for i in range(facts))
    prompt = engine.tokenize(f"<|im_start|>user\n{text} Which river is longest?<|im_end|>\n"
                             "<|im_start|>assistant\n")
    other = engine.tokenize("<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
                            "<|im_start|>assistant\n")
    if facts > 40:  # past the cells where an F16 cache would change kernels
        assert len(prompt) > 512

    _clear(engine)
    tokens, alone = _greedy(engine, {0: prompt})[0]
    _clear(engine)
    # beside another sequence, a filler row without logits in the gap (sequence 1)
    beside = _greedy(engine, {0: prompt, 2: other})[0][1]
    _clear(engine)
    whole = _blocks(engine, 0, prompt + tokens, [400, 37, 250])
    _clear(engine)
    other_split = _blocks(engine, 0, prompt + tokens, [23, 2, 64, 300])

    n = len(prompt)
    assert all(np.array_equal(a, b) for a, b in zip(alone, beside))
    # the logits before answer token t come from the row of token t-1 (the prompt's last)
    assert all(np.array_equal(alone[t], whole[n - 1 + t]) for t in range(ANSWER))
    assert all(np.array_equal(a, b) for a, b in zip(whole, other_split))
