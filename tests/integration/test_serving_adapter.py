"""The Q8_0 serving copy of an adapter (converters/formats/lora_q8.py, edge_tune/llama/serving_copy.py).

What it must keep: the product ``alpha / rank * B A`` of every pair (rank padded to 32, B
and alpha rescaled, as llama.cpp reads it), also for a barely trained B; an adapter it cannot
convert whole is served as written; what it buys: a lone row computes as it would beside others (no filler row), measured
by the engine; what it costs: the default model's logits move by about as much as an F16
KV cache moves them from an F32 one (docs/serving.md).
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.gguf_helpers import write_adapter  # noqa: E402


def _pairs(path: Path) -> tuple[dict, float]:
    """{base name: (A (rank, n_in), B (n_out, rank), type of A)} and alpha of an adapter."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    arrays = {t.name: (dequantize(t.data, t.tensor_type).reshape(
        tuple(reversed([int(x) for x in t.shape]))), t.tensor_type) for t in reader.tensors}
    pairs = {n[:-7]: (arrays[n][0], arrays[n[:-7] + ".lora_b"][0], arrays[n][1])
             for n in arrays if n.endswith(".lora_a")}
    alpha = reader.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    return pairs, float(alpha.contents()) if alpha is not None else 0.0


def _delta(pairs: dict, alpha: float, name: str) -> np.ndarray:
    """What llama.cpp adds to ``name``'s output: ``alpha / rank * B A`` (1 * B A without
    an alpha; rank = B's width, llama-adapter.h)."""
    a, b, _ = pairs[name]
    return (alpha / b.shape[1] if alpha else 1.0) * b @ a


@pytest.mark.parametrize("alpha, size", [(16.0, 1.0), (0.0, 1.0), (16.0, 1e-5)],
                         ids=["alpha", "no-alpha", "barely-trained-B"])
def test_the_copy_keeps_every_pairs_product(tmp_path, alpha, size):
    import gguf

    from edge_tune.converters.formats.lora_q8 import write_q8_copy

    rng = np.random.default_rng(3)
    tensors = {"blk.0.attn_q.weight.lora_a": rng.normal(size=(8, 64)) * 0.05,
               "blk.0.attn_q.weight.lora_b": rng.normal(size=(64, 8)) * size,
               "blk.1.ffn_down.weight.lora_a": rng.normal(size=(12, 128)) * 0.05,
               "blk.1.ffn_down.weight.lora_b": rng.normal(size=(64, 12)) * size * 30}
    src = write_adapter(tmp_path / "a.gguf", "llama", tensors, alpha=alpha)
    if not alpha:  # an adapter without alpha: llama.cpp then scales by 1, not alpha / rank
        src = _without_alpha(src, tmp_path / "no-alpha.gguf")
    dst = tmp_path / "q8.gguf"
    assert write_q8_copy(src, dst) == 2

    before, alpha_before = _pairs(src)
    after, alpha_after = _pairs(dst)
    assert alpha_before == alpha and alpha_after > 0
    for name, (a, b, kind) in after.items():
        assert kind == gguf.GGMLQuantizationType.Q8_0 and a.shape[0] == 32 == b.shape[1]
        want, got = _delta(before, alpha, name), _delta(after, alpha_after, name)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.01, name


def test_an_adapter_with_a_pair_q8_0_cannot_hold_is_served_as_written(tmp_path, monkeypatch):
    from edge_tune.llama.serving_copy import serving_copy

    monkeypatch.setenv("EDGE_TUNE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(4)
    # the token embedding: read by rows, not multiplied; alone, or beside a pair that could
    embedding = {"token_embd.weight.lora_a": rng.normal(size=(8, 100)),
                 "token_embd.weight.lora_b": rng.normal(size=(64, 8))}
    query = {"blk.0.attn_q.weight.lora_a": rng.normal(size=(8, 64)),
             "blk.0.attn_q.weight.lora_b": rng.normal(size=(64, 8))}
    for name, tensors in (("e", embedding), ("qe", {**query, **embedding})):
        src = write_adapter(tmp_path / f"{name}.gguf", "llama", tensors)
        assert serving_copy(src) == src
        assert serving_copy(src) == src  # remembered, not converted again


def test_a_damaged_cached_copy_is_made_again(tmp_path, monkeypatch):
    from edge_tune.llama.serving_copy import serving_copy

    monkeypatch.setenv("EDGE_TUNE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(5)
    src = write_adapter(tmp_path / "a.gguf", "llama",
                        {"blk.0.attn_q.weight.lora_a": rng.normal(size=(8, 64)),
                         "blk.0.attn_q.weight.lora_b": rng.normal(size=(64, 8))})
    copy = serving_copy(src)
    whole = copy.read_bytes()
    copy.write_bytes(whole[:2000])  # cut short behind edge-tune's back
    assert serving_copy(src) == copy and copy.read_bytes() == whole


def _without_alpha(src: Path, dst: Path) -> Path:
    from edge_tune.converters.formats.base_info import (copy_fields, field_value, open_gguf,
                                                        writing_gguf)

    reader = open_gguf(src)
    with writing_gguf(dst, field_value(reader, "general.architecture")) as w:
        copy_fields(reader, w, skip={"adapter.lora.alpha"})
        for t in reader.tensors:
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    return dst


@pytest.fixture(scope="module")
def pirate():
    from tests.helpers.serve_helpers import trained_adapters

    return trained_adapters()["pirate"] / "adapter.gguf"


def test_the_engine_serves_the_copy_without_filler_rows(default_gguf, pirate):
    from edge_tune.llama.engine import Engine

    with Engine(default_gguf, n_ctx=256, threads=1) as eng:
        eng.add_adapter(pirate, "p")
        eng.activate_mix((("p", 1.0),))
        if platform.machine().lower() in ("x86_64", "amd64"):
            assert eng.llm.batch.lone_ok  # measured: Q8_0 one row = several rows
    with Engine(default_gguf, n_ctx=256, threads=1, exact=True) as eng:
        eng.add_adapter(pirate, "p")  # as written (F32): parity checks see the real adapter
        eng.activate_mix((("p", 1.0),))
        assert not eng.llm.batch.lone_ok


def test_the_copy_moves_logits_as_little_as_an_f16_cache_does(default_gguf, pirate):
    """Teacher-forced on a 50-token pirate answer, F32 KV cache: the Q8_0 copy against the
    adapter as written. Measured: KL 3-4.5e-3 nats, top-1 91-95 %; an F16 cache against an
    F32 one, same adapter: KL 3.6-4.3e-3, top-1 91-97 %."""
    from edge_tune.llama.engine import Engine
    from edge_tune.llama.serving_copy import serving_copy

    with Engine(default_gguf, n_ctx=256, threads=1, logits_all=True, exact=True) as eng:
        eng.add_adapter(pirate, "f32")
        eng.add_adapter(serving_copy(pirate), "q8")
        tokens = eng.tokenize("<|im_start|>user\nWhat do bees make?<|im_end|>\n"
                              "<|im_start|>assistant\nArr, matey! Bees be makin' honey, sweet "
                              "as treasure, and wax for their combs, that they do.")
        logp = {}
        for name in ("f32", "q8"):
            eng.activate_mix(((name, 1.0),))
            z = eng.logits(tokens).astype(np.float64)
            z -= z.max(axis=1, keepdims=True)
            logp[name] = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p, q = logp["f32"], logp["q8"]
    kl = float((np.exp(p) * (p - q)).sum(axis=1).mean())
    top1 = float((p.argmax(axis=1) == q.argmax(axis=1)).mean())
    assert kl < 0.01 and top1 >= 0.85, (kl, top1)
