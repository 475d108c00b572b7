"""Speculative decoding (prompt lookup) changes no answer: greedy answers equal plain
decoding's token for token, and so do sampled ones with the same seed, alone and under the
server's batching, with and without an adapter, on the default model (quantized weights: a
drafted run decodes beside other sequences in one step) and on a tiny F32 model (a drafted run
decodes alone, a lone row computing otherwise). Each case also checks that guesses were kept
and others thrown away, so both paths of the check ran."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.helpers.gguf_helpers import write_adapter  # noqa: E402
from tests.helpers.tiny_models import tiny_adapter  # noqa: E402

# prompts that make an answer copy (lists, a quoted line) and one that does not
PROMPTS = ["Repeat exactly, twice: red fox, blue owl, green frog, yellow bee.",
           "Copy this line: The quick brown fox jumps over the lazy dog near the river.",
           "What do bees make?"]
TOKENS = 28


def _default_adapter(path):
    """A random r=8 LoRA on every block's q and ffn_up of the default model."""
    rng = np.random.default_rng(5)
    tensors = {}
    for b in range(30):
        tensors[f"blk.{b}.attn_q.weight.lora_a"] = rng.normal(size=(8, 576)) * 0.05
        tensors[f"blk.{b}.attn_q.weight.lora_b"] = rng.normal(size=(576, 8)) * 0.05
        tensors[f"blk.{b}.ffn_up.weight.lora_a"] = rng.normal(size=(8, 576)) * 0.05
        tensors[f"blk.{b}.ffn_up.weight.lora_b"] = rng.normal(size=(1536, 8)) * 0.05
    return write_adapter(path, "llama", tensors, alpha=8.0)


@pytest.fixture(scope="module", params=["tiny", "default"])
def model(request, tmp_path_factory, default_gguf):
    """(base GGUF, adapter GGUF, speculative settings, whether drafts join a step)."""
    from edge_tune.llama.speculative import Speculative

    root = tmp_path_factory.mktemp("spec")
    if request.param == "tiny":
        base = request.getfixturevalue("tiny")
        # a random model rarely repeats itself at length: guess from one token on
        return base, tiny_adapter(root / "a.gguf"), Speculative("ngram", 6, 1, 1), False
    return default_gguf, _default_adapter(root / "a.gguf"), Speculative("auto"), True


def _engine(model, parallel: int):
    from edge_tune.llama.engine import Engine

    base, adapter, _, _ = model
    engine = Engine(base, n_ctx=512, threads=1, parallel=parallel, prompt_cache=False)
    engine.add_adapter(adapter, "a")
    return engine


def _answer(engine, mix, prompt, **kw) -> str:
    engine.activate_mix(mix)
    pieces = engine.generate(messages=[{"role": "user", "content": prompt}],
                             max_tokens=TOKENS, **kw)
    return "".join(p.text for p in pieces)


def _logprobs(engine) -> list:
    """The logprobs the server reports for a greedy answer (its recorder, a logits
    processor that reads the tokens so far), as (token, logprob, top logprobs)."""
    from edge_tune.llama.engine import logits_processors
    from edge_tune.server.logprobs import LogprobRecorder

    rec = LogprobRecorder(3, engine.token_bytes,
                          lambda raw: engine.tokenize(raw.decode("utf-8"), special=False))
    _answer(engine, (), PROMPTS[1], temperature=0, logits_processor=logits_processors(rec))
    return [(t.text, t.logprob, [x[2] for x in t.top]) for t in rec.take(0)]


CASES = [(mix, prompt) for mix in [(), (("a", 1.0),)] for prompt in PROMPTS]
SAMPLED = {"temperature": 0.9, "seed": 11}


@pytest.fixture(scope="module")
def plain(model):
    """Plain decoding's answers: {(mix, prompt, sampled): text}."""
    engine = _engine(model, 1)
    try:
        out = {(m, p, False): _answer(engine, m, p, temperature=0) for m, p in CASES}
        out.update({(m, p, True): _answer(engine, m, p, **SAMPLED) for m, p in CASES[:2]})
        out["logprobs"] = _logprobs(engine)
        return out
    finally:
        engine.close()


def test_one_sequence_with_guesses_answers_as_plain_decoding(model, plain):
    engine = _engine(model, 1)
    engine.speculative = model[2]
    try:
        for mix, prompt in CASES:
            assert _answer(engine, mix, prompt, temperature=0) == plain[mix, prompt, False]
        for mix, prompt in CASES[:2]:
            assert _answer(engine, mix, prompt, **SAMPLED) == plain[mix, prompt, True]
        assert _logprobs(engine) == plain["logprobs"]  # bit for bit
        stats = engine.draft_stats
        assert 0 < stats["kept"] < stats["drafted"], stats
    finally:
        engine.close()


async def _serve(scheduler, requests) -> list[str]:
    jobs = [scheduler.submit(r) for r in requests]
    texts = []
    for job in jobs:
        pieces, (kind, last) = await job.rest_of_answer(await job.events.get())
        if kind == "error":
            raise last
        texts.append("".join(p.text for p in pieces) + last.text)
    return texts


def test_batched_sequences_with_guesses_answer_as_plain_decoding(model, plain):
    """Every case at once on a server's scheduler (base and adapter sequences take turns,
    each decoding its drafts in the steps of its set)."""
    from edge_tune.server.openai_shapes import GenRequest
    from edge_tune.server.scheduler import Scheduler

    engine = _engine(model, 4)
    engine.speculative = model[2]
    scheduler = Scheduler(engine)
    cases = [(m, p, False) for m, p in CASES] + [(m, p, True) for m, p in CASES[:2]]
    requests = [GenRequest("chat", "a" if mix else "base", True,
                           messages=[{"role": "user", "content": prompt}], max_tokens=TOKENS,
                           **(SAMPLED if sampled else {"temperature": 0}))
                for mix, prompt, sampled in cases]
    try:
        got = asyncio.run(_serve(scheduler, requests))
        assert dict(zip(cases, got)) == {c: plain[c] for c in cases}
        assert scheduler.stats.max_batch >= 2
        stats = engine.draft_stats
        assert 0 < stats["kept"] < stats["drafted"], stats
        assert (engine.batch.shared_draft_steps > 0) == model[3]
    finally:
        scheduler.close()
        engine.close()
