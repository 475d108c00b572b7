"""One base, three engines, the same numbers: torch, mlx and llama.cpp on each model family.

Start from the GGUF alone, as a user who downloaded it: the torch model is edge-tune's
dequantized HF copy (``models.dequantized_copy``, what the cpu backend trains), mlx loads that
copy exactly as the mlx backend does (``mlx_config.mlx_load_kwargs``), llama.cpp runs the F32
GGUF. On the same tokens (a chat rendered with the family's own template), the logits agree
to a relative error (max |a - b| / max |b|) of at most 1e-3 between each pair. This is what
catches config translation faults: RoPE base and scaling, head size, soft-caps, query scale,
sliding windows (tests/helpers/tiny_families.py makes every one of them non-default).

mlx-lm's gemma2 and phi3 models have no sliding window: mlx is compared on the positions up to
the window (``mlx_exact_length``) and shown to differ past it on gemma2 (its tiny window is 128).

The real embedded default model (SmolLM2-135M, Q4_1) is compared the same way, torch and mlx on
its dequantized copy and llama.cpp on an F32 copy of the GGUF, on a short sequence (mlx on a
CPU is slow).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.helpers.tiny_families import FAMILIES, NAMES, family_gguf
from tests.helpers.engines import MESSAGES, TOL, mlx_logits, rel_err, three_engines, torch_logits

pytest.importorskip("mlx_lm")
pytest.importorskip("llama_cpp")

@pytest.mark.parametrize("name", NAMES)
def test_one_base_three_engines(name, capsys):
    from transformers import AutoTokenizer

    from edge_tune import models

    gguf = family_gguf(name)  # F32 already: llama.cpp runs the very file
    hf_dir = models.dequantized_copy(gguf)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    text = tok.apply_chat_template(MESSAGES * 4, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    window = FAMILIES[name].config.get("sliding_window") or 0
    if window <= 128:  # the tiny windows (gemma2 128, gemma3 16) are exercised
        assert len(ids) > window
    errs, k, lm, lt = three_engines(gguf, hf_dir, ids)
    with capsys.disabled():
        print(f"\n{name}: {len(ids)} tokens, mlx exact for {k}: "
              + ", ".join(f"{p} {e:.1e}" for p, e in errs.items()))
    assert max(errs.values()) <= TOL, errs
    if k < len(ids):  # mlx attends past the window, torch and llama.cpp do not
        assert rel_err(lm, lt) > 10 * TOL


def test_the_family_configs_are_what_llama_cpp_computes_with():
    """The quirks each tiny family exists for reach the dequantized copy (transformers' GGUF
    loader alone drops them: edge_tune/gguf_config.py)."""
    from edge_tune import models

    def cfg(name):
        return json.loads((models.dequantized_copy(family_gguf(name)) / "config.json")
                          .read_text())

    llama = cfg("llama")["rope_parameters"]
    assert llama["rope_type"] == "llama3" and llama["factor"] == 32.0
    assert llama["rope_theta"] == 500000.0
    assert cfg("qwen3")["head_dim"] == 32
    g2 = cfg("gemma2")
    assert (g2["attn_logit_softcapping"], g2["final_logit_softcapping"],
            g2["query_pre_attn_scalar"]) == (7.5, 4.0, 16)
    g3 = cfg("gemma3")
    assert g3["rope_parameters"]["full_attention"] == {"rope_type": "linear", "factor": 8.0,
                                                        "rope_theta": 1000000.0}
    assert g3["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert g3["layer_types"].count("full_attention") == 1
    assert cfg("phi3")["sliding_window"] == 2047


def test_base_gguf_is_the_same_model_without_a_template():
    import gguf

    with_t, base = (gguf.GGUFReader(family_gguf("gemma3", template=t)) for t in (True, False))
    assert "tokenizer.chat_template" in with_t.fields
    assert "tokenizer.chat_template" not in base.fields
    assert set(with_t.fields) - set(base.fields) == {"tokenizer.chat_template"}
    assert [(t.name, t.data.tobytes()) for t in with_t.tensors] == \
        [(t.name, t.data.tobytes()) for t in base.tensors]


def test_stock_mlx_load_reads_no_rope_base_from_transformers_5_configs():
    """The fault mlx_config fixes, reproduced: stock ``mlx_lm.load`` of a config written by
    transformers 5 (RoPE base 1e6 under ``rope_parameters``) runs RoPE base 10000."""
    from transformers import AutoTokenizer

    from edge_tune import models

    hf_dir = models.dequantized_copy(family_gguf("mistral"))
    assert "rope_theta" not in json.loads((hf_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(tok.apply_chat_template(MESSAGES, tokenize=False),
              add_special_tokens=False)["input_ids"]
    stock, ours = mlx_logits(hf_dir, ids, translate=False), mlx_logits(hf_dir, ids)
    if rel_err(stock, ours) <= TOL:
        pytest.skip("this mlx-lm reads rope_parameters itself: mlx_config may be simplified")
    assert rel_err(stock, torch_logits(hf_dir, ids)) > 0.1


def test_real_default_model_three_engines(default_gguf, hf_dir, f32_base, capsys):
    """SmolLM2-135M (RoPE base 100000): torch and mlx on the dequantized copy, llama.cpp on an
    F32 copy of the GGUF; 16 tokens. Stock mlx (RoPE base 10000) is ~10 % off."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(tok.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"][-16:]
    errs, _, lm, _ = three_engines(f32_base, hf_dir, ids)
    stock = rel_err(mlx_logits(hf_dir, ids, translate=False), lm)
    with capsys.disabled():
        print(f"\ndefault model: {len(ids)} tokens: "
              + ", ".join(f"{p} {e:.1e}" for p, e in errs.items())
              + f"; stock mlx_lm.load vs ours {stock:.1e}")
    assert max(errs.values()) <= TOL, errs


def test_every_family_has_a_builtin_template():
    from edge_tune.templates.builtin import BUILTIN

    assert all(f.template in BUILTIN for f in FAMILIES.values())


# --- the translations, as pure functions ---------------------------------------------------

def _llama3_divisors(factor, theta, head_dim, low=1.0, high=4.0, ctx=8192):
    import math

    out = []
    for i in range(head_dim // 2):
        wavelen = 2 * math.pi * theta ** (2 * i / head_dim)
        if wavelen < ctx / high:
            out.append(1.0)
        elif wavelen > ctx / low:
            out.append(factor)
        else:
            s = (ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - s) / factor + s))
    return out


def test_llama3_rope_scaling_is_recovered_from_rope_freqs_or_refused():
    from edge_tune.gguf_config import UnsupportedRope, fix_config, llama3_scaling

    divisors = _llama3_divisors(8.0, 500000.0, 128)  # Llama 3.1 8B
    assert llama3_scaling(divisors, 500000.0, 128) == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    # a ramp that is not linear in 1/wavelength: no llama3 parameters give it
    odd = [d if d in (1.0, 8.0) else d ** 1.5 / 8.0 ** 0.5 for d in divisors]
    assert llama3_scaling(odd, 500000.0, 128) is None
    kv = {"general.architecture": "llama", "llama.rope.freq_base": 500000.0,
          "llama.attention.key_length": 128}
    base = {"hidden_size": 4096, "num_attention_heads": 32,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    fixed = fix_config(base, kv, {"rope_freqs.weight": divisors})
    assert fixed["rope_parameters"]["rope_type"] == "llama3" and base["rope_parameters"][
        "rope_type"] == "default"  # a new dict
    with pytest.raises(UnsupportedRope, match="follow no llama3 curve"):
        fix_config(base, kv, {"rope_freqs.weight": odd})


@pytest.mark.parametrize("factor,low,high,ctx,theta,head_dim", [
    (8.0, 1.0, 4.0, 8192, 500000.0, 128), (32.0, 1.0, 4.0, 8192, 500000.0, 64),
    (16.0, 2.0, 8.0, 2048, 500000.0, 128), (8.0, 1.0, 2.0, 2048, 500000.0, 128),
    (8.0, 1.0, 4.0, 256, 500000.0, 16), (4.0, 0.5, 3.0, 4096, 10000.0, 64)])
def test_llama3_rope_scaling_round_trips_any_low_high_and_context(factor, low, high, ctx, theta,
                                                                   head_dim):
    """divisors (as llama.cpp's converter computes them) -> solved parameters -> the same
    divisors; with the GGUF's original context and a ramp that two frequencies sample, the
    published low/high come back too."""

    from edge_tune.gguf_config import fix_config, llama3_scaling

    # the GGUF stores F32 divisors
    divisors = [float(d) for d in np.float32(_llama3_divisors(factor, theta, head_dim, low,
                                                               high, ctx))]
    found = llama3_scaling(divisors, theta, head_dim)  # no original context in the GGUF
    again = _llama3_divisors(found["factor"], theta, head_dim, found["low_freq_factor"],
                             found["high_freq_factor"], found["original_max_position_embeddings"])
    assert np.allclose(again, divisors, rtol=1e-6, atol=0), (found, again, divisors)
    kv = {"general.architecture": "llama", "llama.rope.freq_base": theta,
          "llama.attention.key_length": head_dim,
          "llama.rope.scaling.original_context_length": ctx}
    rope = fix_config({"hidden_size": 4 * head_dim, "num_attention_heads": 4}, kv,
                      {"rope_freqs.weight": divisors})["rope_parameters"]
    assert rope["original_max_position_embeddings"] == ctx
    if sum(1.0 < d < factor for d in divisors) < 2:
        return  # the ramp is not sampled twice: other low/high give the same divisors
    assert (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]) == pytest.approx(
        (factor, low, high), rel=1e-5)


def test_mlx_model_config_puts_rope_where_mlx_lm_reads_it():
    from edge_tune.training.backends.mlx_config import (NotExpressible, mlx_exact_length,
                                                         mlx_model_config)

    assert mlx_model_config({"rope_parameters": {"rope_theta": 100000.0,
                                                 "rope_type": "default"}}) == {
        "rope_theta": 100000.0, "rope_scaling": None}
    llama3 = {"rope_type": "llama3", "factor": 32.0, "rope_theta": 500000.0}
    assert mlx_model_config({"rope_parameters": llama3})["rope_scaling"] == {
        "rope_type": "llama3", "type": "llama3", "factor": 32.0}
    layer_types = ["sliding_attention"] * 5 + ["full_attention"]
    g3 = {"model_type": "gemma3_text", "layer_types": layer_types, "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    assert mlx_model_config(g3) == {
        "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window_pattern": 6,
        "rope_scaling": {"rope_type": "linear", "type": "linear", "factor": 8.0}}
    with pytest.raises(NotExpressible):
        mlx_model_config({**g3, "layer_types": ["full_attention"] + layer_types[1:]})
    assert mlx_exact_length({"model_type": "gemma2", "sliding_window": 4096}) == 4096
    assert mlx_exact_length({"model_type": "gemma3_text", "sliding_window": 512}) is None
    assert mlx_exact_length({"model_type": "qwen2", "sliding_window": 32768,
                             "use_sliding_window": False}) is None


def test_mlx_refuses_a_seq_len_past_a_window_it_does_not_apply(tmp_path):
    from edge_tune.training.backends.mlx_config import mlx_load_kwargs
    from edge_tune.errors import EdgeTuneError

    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gemma2", "sliding_window": 4096,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}))
    assert mlx_load_kwargs(tmp_path, 4096)["model_config"]["rope_theta"] == 10000.0
    with pytest.raises(EdgeTuneError, match=r"^--seq-len 8192: mlx-lm's gemma2 model has no "
                                            r"sliding window.*--backend cpu\)$"):
        mlx_load_kwargs(tmp_path, 8192)
