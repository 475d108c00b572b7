"""Converter exactness: llama.cpp (base+adapter - base) == PEFT (tuned - base), same tokens.

Run on an F32 copy of the embedded model's GGUF (and with an F32 KV cache) so that
quantization noise cannot hide converter errors. The last test shows the check tells a right
converter from a wrong one: without the Llama q/k row permutation the error is large.
"""

from __future__ import annotations

import numpy as np
import pytest

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        "The capital of France is Paris, a city on the Seine")


@pytest.fixture(scope="module")
def engine(f32_base):
    from edge_tune.llama.engine import Engine

    with Engine(f32_base, n_ctx=256, logits_all=True, exact=True) as eng:
        yield eng


@pytest.fixture(scope="module")
def base_model(hf_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)


def _peft_delta(base_model, tokens, out_dir, **lora_kw):
    """Random non-zero LoRA on all seven projections; PEFT's tuned - base logits."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=TARGETS,
                     **lora_kw)
    model = get_peft_model(base_model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(0.5 if "lora_A" in name else 0.03)
        ids = torch.tensor([tokens])
        tuned = model(ids).logits[0].numpy()
        with model.disable_adapter():
            base = model(ids).logits[0].numpy()
    model.save_pretrained(str(out_dir))
    model.unload()  # give the shared base model back without LoRA layers
    return tuned - base


def _llama_delta(engine, adapter_path, tokens):
    engine.activate(None)
    base = engine.logits(tokens)
    name = engine.add_adapter(adapter_path, str(adapter_path))
    engine.activate(name)
    tuned = engine.logits(tokens)
    engine.activate(None)
    return tuned - base


def _rel_err(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_llama_cpp_matches_peft(engine, base_model, f32_base, tmp_path, rslora):
    from edge_tune.converters.formats import base_info, peft_to_gguf

    tokens = engine.tokenize(TEXT)
    want = _peft_delta(base_model, tokens, tmp_path / "peft", use_rslora=rslora)
    assert np.linalg.norm(want) > 1.0  # the adapter really changes the logits
    out = tmp_path / "adapter.gguf"
    plan = peft_to_gguf.convert(tmp_path / "peft", base_info.from_gguf(f32_base), out)
    assert plan.alpha == pytest.approx(16 * 8 ** 0.5 if rslora else 16)
    got = _llama_delta(engine, out, tokens)
    err = _rel_err(got, want)
    print(f"relative error ({'rslora' if rslora else 'lora'}): {err:.5f}")
    assert err <= 0.02


def test_parity_check_catches_a_missing_qk_permutation(engine, base_model, f32_base, tmp_path,
                                                        monkeypatch):
    from edge_tune.converters.formats import base_info, names, peft_to_gguf

    tokens = engine.tokenize(TEXT)
    want = _peft_delta(base_model, tokens, tmp_path / "peft")
    monkeypatch.setattr(peft_to_gguf, "needs_rope_permute", lambda arch, name: None)
    out = tmp_path / "wrong.gguf"
    peft_to_gguf.convert(tmp_path / "peft", base_info.from_gguf(f32_base), out)
    assert names.ROPE_PERMUTED_ARCHS  # the real converter does permute llama
    assert _rel_err(_llama_delta(engine, out, tokens), want) > 0.05
