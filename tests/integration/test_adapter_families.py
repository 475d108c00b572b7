"""Per family (llama, qwen2, qwen3, gemma2, gemma3, phi3, mistral: ``tiny_families``), adapters
made with PEFT on the HF checkpoint run in llama.cpp on the GGUF that llama.cpp's converter made
from it, and compute what PEFT computes; what llama.cpp cannot compute is refused, and the
route named (``--merge``) works and matches PEFT.

Covers each architecture's graph facts the shared check relies on (``lora_graph``): q/k rope
permutation (llama, mistral) or none (qwen, gemma, phi3), phi3's fused ``qkv_proj`` /
``gate_up_proj`` (one GGUF tensor each, 2 x n_ff rows for gate/up), tied output on qwen2/qwen3/
gemma2/gemma3 (an embedding LoRA is refused; gemma2's output is *always* the embedding, so even
the merge is refused there), Gemma's scaled embeddings (llama.cpp scales the LoRA delta with the
embedding, as PEFT does).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from tests.helpers.adapter_helpers import peft_adapter, rel
from tests.helpers.tiny_families import NAMES, family_gguf, family_hf

from edge_tune.errors import EdgeTuneError

TOKENS = [2, 17, 45, 101, 230, 7, 88, 301, 12, 64]
PROJ = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TIED = {"qwen2", "qwen3", "gemma2", "gemma3"}
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def fam():
    """name -> (GGUF path, HF model, engine on the GGUF); built on first use."""
    from edge_tune.llama.engine import Engine

    built, engines = {}, []

    def get(name):
        if name not in built:
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(family_hf(name)),
                                                         dtype=torch.float32).eval()
            eng = Engine(family_gguf(name), n_ctx=64, logits_all=True, exact=True)
            engines.append(eng)
            built[name] = (family_gguf(name), model, eng)
        return built[name]

    yield get
    for e in engines:
        e.close()


def _effect(eng, adapter):
    eng.activate(None)
    base = eng.logits(TOKENS)
    eng.activate(eng.add_adapter(adapter, str(adapter)))
    try:
        return eng.logits(TOKENS) - base
    finally:
        eng.activate(None)


def _export(peft_dir, base, out, merge=False):
    from edge_tune import api

    api.export(peft_dir, base=base, out=out, merge=merge, quant="F32" if merge else None)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_projections_match_peft_as_gguf_and_merged(name, fam, tmp_path):
    from edge_tune.llama.engine import Engine

    gguf, model, eng = fam(name)
    tuned, base = peft_adapter(copy.deepcopy(model), tmp_path / "peft", tokens=TOKENS,
                               target_modules=PROJ.get(name, ALL7), r=8, lora_alpha=16)
    want = tuned - base
    assert np.linalg.norm(want) > 0.1
    err = rel(_effect(eng, _export(tmp_path / "peft", gguf, tmp_path / "a.gguf")), want)
    with Engine(_export(tmp_path / "peft", gguf, tmp_path / "m.gguf", merge=True), n_ctx=64,
                logits_all=True, exact=True) as merged:
        merged_err = rel(merged.logits(TOKENS), tuned)
    RESULTS[f"{name}/projections"] = err
    RESULTS[f"{name}/projections merged"] = merged_err
    print(f"{name}: adapter effect error {err:.2e}, merged logits error {merged_err:.2e}")
    assert err <= 0.02
    assert merged_err <= 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_embedding_lora(name, fam, tmp_path):
    """Untied: a GGUF adapter that matches PEFT. Tied: refused naming the merge, and the merge
    unties and matches PEFT. gemma2 (output always the embedding): both refused, naming vLLM."""
    from edge_tune.llama.engine import Engine

    gguf, model, eng = fam(name)
    tuned, base = peft_adapter(copy.deepcopy(model), tmp_path / "peft", tokens=TOKENS,
                               target_modules=["embed_tokens", "v_proj" if name != "phi3"
                                               else "o_proj"])
    want = tuned - base
    assert np.linalg.norm(want) > 0.1
    if name not in TIED:
        err = rel(_effect(eng, _export(tmp_path / "peft", gguf, tmp_path / "a.gguf")), want)
        RESULTS[f"{name}/embedding"] = err
        print(f"{name}: embedding LoRA effect error {err:.2e}")
        assert err <= 0.02
        return
    with pytest.raises(EdgeTuneError) as info:
        _export(tmp_path / "peft", gguf, tmp_path / "a.gguf")
    msg = str(info.value)
    assert "token_embd.weight" in msg and "tied" in msg and "\n" not in msg
    if name == "gemma2":
        assert "--vllm" in msg
        with pytest.raises(EdgeTuneError, match="--vllm"):
            _export(tmp_path / "peft", gguf, tmp_path / "m.gguf", merge=True)
        return
    assert "--merge" in msg
    with Engine(_export(tmp_path / "peft", gguf, tmp_path / "m.gguf", merge=True), n_ctx=64,
                logits_all=True, exact=True) as merged:
        err = rel(merged.logits(TOKENS), tuned)
    RESULTS[f"{name}/embedding merged (untied)"] = err
    print(f"{name}: embedding LoRA merged, logits error {err:.2e}")
    assert err <= 1e-3


@pytest.mark.parametrize("name", [n for n in NAMES if n not in TIED])
def test_lm_head_lora_on_untied_family(name, fam, tmp_path):
    gguf, model, eng = fam(name)
    tuned, base = peft_adapter(copy.deepcopy(model), tmp_path / "peft", tokens=TOKENS,
                               target_modules=["lm_head"])
    err = rel(_effect(eng, _export(tmp_path / "peft", gguf, tmp_path / "a.gguf")), tuned - base)
    RESULTS[f"{name}/lm_head"] = err
    print(f"{name}: lm_head LoRA effect error {err:.2e}")
    assert err <= 0.02


def test_phi3_fused_tensors_are_one_gguf_tensor_each(fam, tmp_path):
    import gguf as gg

    gguf, model, _ = fam("phi3")
    peft_adapter(copy.deepcopy(model), tmp_path / "peft", tokens=TOKENS,
                 target_modules=["qkv_proj", "gate_up_proj"])
    out = _export(tmp_path / "peft", gguf, tmp_path / "a.gguf")
    shapes = {t.name: [int(x) for x in t.shape] for t in gg.GGUFReader(str(out)).tensors}
    base = {t.name: [int(x) for x in t.shape] for t in gg.GGUFReader(str(gguf)).tensors}
    assert shapes["blk.0.ffn_up.weight.lora_b"][1] == base["blk.0.ffn_up.weight"][1]
    assert base["blk.0.ffn_up.weight"][1] == 2 * base["blk.0.ffn_down.weight"][0]  # gate + up
    assert shapes["blk.0.attn_qkv.weight.lora_b"][1] == base["blk.0.attn_qkv.weight"][1]


def test_print_results():
    for k, v in sorted(RESULTS.items()):
        print(f"{k}: {v:.2e}")


def test_trained_base_biases_merge_like_peft(fam, tmp_path):
    """PEFT's ``bias="lora_only"`` trains the adapted layers' own biases (qwen2 has q/k/v
    biases): no GGUF LoRA form, refused naming --merge; the merge matches PEFT."""
    import torch

    from edge_tune.llama.engine import Engine

    gguf, model, _ = fam("qwen2")
    m = copy.deepcopy(model)
    with torch.no_grad():  # PEFT saves the biases as trained: move them off the base's
        for name, p in m.named_parameters():
            if name.endswith(("q_proj.bias", "v_proj.bias")):
                p.add_(0.3 * torch.randn_like(p))
    tuned, _ = peft_adapter(m, tmp_path / "peft", tokens=TOKENS,
                            target_modules=["q_proj", "v_proj"], bias="lora_only")
    with pytest.raises(EdgeTuneError, match=r"bias='lora_only'.*--merge"):
        _export(tmp_path / "peft", gguf, tmp_path / "a.gguf")
    with Engine(_export(tmp_path / "peft", gguf, tmp_path / "m.gguf", merge=True), n_ctx=64,
                logits_all=True, exact=True) as merged:
        err = rel(merged.logits(TOKENS), tuned)
    RESULTS["qwen2/bias=lora_only merged"] = err
    print(f"qwen2 bias=lora_only merged: logits error {err:.2e}")
    assert err <= 1e-3
