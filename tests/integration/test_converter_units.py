"""PEFT -> GGUF planning: names, permutation, scales, refusals, outtypes, atomic writes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_tune.converters.formats import peft_to_gguf
from edge_tune.converters.formats.base_info import BaseInfo
from edge_tune.converters.formats.names import rope_permute_rows, split_peft_key
from edge_tune.errors import EdgeTuneError

N_HEAD, N_KV, DIM, KV_DIM, FFN = 4, 2, 32, 16, 48


def tiny_base(tied=True) -> BaseInfo:
    tensors = {"token_embd.weight": (DIM, 100)}
    for b in range(2):
        tensors.update({
            f"blk.{b}.attn_q.weight": (DIM, DIM), f"blk.{b}.attn_k.weight": (DIM, KV_DIM),
            f"blk.{b}.attn_v.weight": (DIM, KV_DIM), f"blk.{b}.attn_output.weight": (DIM, DIM),
            f"blk.{b}.ffn_gate.weight": (DIM, FFN), f"blk.{b}.ffn_up.weight": (DIM, FFN),
            f"blk.{b}.ffn_down.weight": (FFN, DIM)})
    if not tied:
        tensors["output.weight"] = (DIM, 100)
    return BaseInfo("llama", 2, N_HEAD, N_KV, tensors, tied_embeddings=tied)


def peft_tensors(modules: dict[str, tuple[int, int]], r=4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    out = {}
    for m, (n_in, n_out) in modules.items():
        out[f"base_model.model.{m}.lora_A.weight"] = rng.normal(size=(r, n_in)).astype(np.float32)
        out[f"base_model.model.{m}.lora_B.weight"] = rng.normal(size=(n_out, r)).astype(np.float32)
    return out


CFG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}


def test_split_peft_key():
    assert split_peft_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") == \
        ("model.layers.0.self_attn.q_proj", "lora_A")
    assert split_peft_key("base_model.model.model.embed_tokens.lora_embedding_B") == \
        ("model.embed_tokens", "lora_embedding_B")
    assert split_peft_key("base_model.model.lm_head.weight") is None


def test_rope_permutation_matches_llama_cpp_converter():
    # convert_hf_to_gguf.py LlamaModel.permute, written out independently.
    w = np.arange(DIM * 3, dtype=np.float32).reshape(DIM, 3)
    want = w.reshape(N_HEAD, 2, DIM // N_HEAD // 2, 3).swapaxes(1, 2).reshape(DIM, 3)
    np.testing.assert_array_equal(rope_permute_rows(w, N_HEAD), want)
    # Per head, HF's two halves become interleaved pairs: rows (0, h/2, 1, h/2+1, ...).
    head = DIM // N_HEAD
    got = rope_permute_rows(np.arange(DIM, dtype=np.float32)[:, None], N_HEAD)[:head, 0]
    assert list(got) == [x for pair in zip(range(head // 2), range(head // 2, head)) for x in pair]


def test_plan_names_shapes_and_permutation():
    mods = {"model.layers.0.self_attn.q_proj": (DIM, DIM),
            "model.layers.1.self_attn.k_proj": (DIM, KV_DIM),
            "model.layers.1.mlp.down_proj": (FFN, DIM)}
    tensors = peft_tensors(mods)
    plan = peft_to_gguf.plan(CFG, tensors, tiny_base())
    got = dict(plan.tensors)
    assert set(got) == {"blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b",
                        "blk.1.attn_k.weight.lora_a", "blk.1.attn_k.weight.lora_b",
                        "blk.1.ffn_down.weight.lora_a", "blk.1.ffn_down.weight.lora_b"}
    assert plan.alpha == 8.0
    b_q = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    np.testing.assert_array_equal(got["blk.0.attn_q.weight.lora_b"], rope_permute_rows(b_q, N_HEAD))
    b_k = tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    np.testing.assert_array_equal(got["blk.1.attn_k.weight.lora_b"], rope_permute_rows(b_k, N_KV))
    b_down = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    np.testing.assert_array_equal(got["blk.1.ffn_down.weight.lora_b"], b_down)  # untouched


def test_qwen_is_not_permuted():
    base = tiny_base()
    base.arch = "qwen2"
    tensors = peft_tensors({"model.layers.0.self_attn.q_proj": (DIM, DIM)})
    got = dict(peft_to_gguf.plan(CFG, tensors, base).tensors)
    np.testing.assert_array_equal(
        got["blk.0.attn_q.weight.lora_b"],
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])


def test_rslora_alpha_and_alpha_pattern_folding():
    mods = {"model.layers.0.mlp.up_proj": (DIM, FFN), "model.layers.0.mlp.down_proj": (FFN, DIM)}
    tensors = peft_tensors(mods)
    rs = peft_to_gguf.plan({**CFG, "use_rslora": True}, tensors, tiny_base())
    assert rs.alpha == pytest.approx(8 * math.sqrt(4))
    # alpha_pattern: down_proj uses alpha 32 -> its B carries the extra factor 4.
    pat = dict(peft_to_gguf.plan({**CFG, "alpha_pattern": {"down_proj": 32}}, tensors,
                                 tiny_base()).tensors)
    b = tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    np.testing.assert_allclose(pat["blk.0.ffn_down.weight.lora_b"], b * 4, rtol=1e-6)


def test_embedding_lora_is_flipped():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 100)), rng.normal(size=(DIM, 4))
    tensors = {"base_model.model.model.embed_tokens.lora_embedding_A": a,
               "base_model.model.model.embed_tokens.lora_embedding_B": b}
    got = dict(peft_to_gguf.plan(CFG, tensors, tiny_base(tied=False)).tensors)
    np.testing.assert_allclose(got["token_embd.weight.lora_a"], a.T)
    np.testing.assert_allclose(got["token_embd.weight.lora_b"], b)


@pytest.mark.parametrize("config,extra,message", [
    ({"use_dora": True}, {}, "DoRA"),
    ({}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": np.ones(DIM)},
     "DoRA"),
    ({"modules_to_save": ["lm_head"]}, {}, "modules_to_save"),
    ({"peft_type": "IA3"}, {}, "not LoRA"),
])
def test_refusals(config, extra, message):
    tensors = {**peft_tensors({"model.layers.0.self_attn.q_proj": (DIM, DIM)}), **extra}
    with pytest.raises(EdgeTuneError, match=message):
        peft_to_gguf.plan({**CFG, **config}, tensors, tiny_base())


def test_lm_head_lora_refused_on_tied_base_and_allowed_on_untied():
    tensors = peft_tensors({"lm_head": (DIM, 100)})
    with pytest.raises(EdgeTuneError, match="tied"):
        peft_to_gguf.plan(CFG, tensors, tiny_base(tied=True))
    names = dict(peft_to_gguf.plan(CFG, tensors, tiny_base(tied=False)).tensors)
    assert "output.weight.lora_a" in names


def test_shape_mismatch_is_refused():
    tensors = peft_tensors({"model.layers.0.self_attn.q_proj": (DIM + 8, DIM)})
    with pytest.raises(EdgeTuneError, match="do not fit base shape"):
        peft_to_gguf.plan(CFG, tensors, tiny_base())


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_outtypes_write_valid_adapters(tmp_path, outtype):
    import gguf

    from edge_tune.converters.formats.validate import validate_adapter_file

    tensors = peft_tensors({"model.layers.0.self_attn.q_proj": (DIM, DIM)}, r=32)
    plan = peft_to_gguf.plan(CFG, tensors, tiny_base())
    out = peft_to_gguf.write_gguf(plan, "llama", tmp_path / "a.gguf", outtype)
    meta = validate_adapter_file(out, tiny_base())
    assert meta["adapter.lora.alpha"] == pytest.approx(8.0)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
    want = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    assert types["blk.0.attn_q.weight.lora_a"] == want


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import gguf

    out = tmp_path / "adapter.gguf"
    out.write_bytes(b"previous good file")
    plan = peft_to_gguf.plan(CFG, peft_tensors({"model.layers.0.self_attn.q_proj": (DIM, DIM)}),
                             tiny_base())

    def boom(self, *a, **k):
        raise KeyboardInterrupt  # as if the user hit Ctrl-C mid-write

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(KeyboardInterrupt):
        peft_to_gguf.write_gguf(plan, "llama", out)
    assert out.read_bytes() == b"previous good file"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.gguf"]


@pytest.mark.parametrize("config,needle", [
    ({"init_lora_weights": "pissa_niter_4"}, "path_initial_model_for_weight_conversion"),
    ({"init_lora_weights": "olora"}, "path_initial_model_for_weight_conversion"),
    ({"init_lora_weights": "loftq"}, "convert-base"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "convert-base"),
    ({"peft_type": "LOHA"}, "convert-base"),
    ({"lora_bias": True}, "--merge"),
    ({"use_dora": True}, "--merge"),
])
def test_refusals_name_a_route(config, needle):
    tensors = peft_tensors({"model.layers.0.self_attn.q_proj": (DIM, DIM)})
    with pytest.raises(EdgeTuneError, match=needle):
        peft_to_gguf.plan({**CFG, **config}, tensors, tiny_base())


def test_trainable_tokens_and_resized_vocab_are_refused_with_a_route():
    tensors = peft_tensors({"model.layers.0.self_attn.q_proj": (DIM, DIM)})
    tokens = {**tensors, "base_model.model.model.embed_tokens.token_adapter."
                         "trainable_tokens_delta": np.ones((2, DIM), np.float32)}
    with pytest.raises(EdgeTuneError, match="trainable_token_indices.*convert-base"):
        peft_to_gguf.plan(CFG, tokens, tiny_base())
    resized = {**peft_tensors({"model.layers.0.self_attn.q_proj": (DIM, DIM)}),
               "base_model.model.model.embed_tokens.base_layer.weight":
                   np.ones((101, DIM), np.float32)}
    with pytest.raises(EdgeTuneError, match="resized vocabulary.*convert-base"):
        peft_to_gguf.plan(CFG, resized, tiny_base(tied=False))


def test_fan_in_fan_out_changes_nothing():
    tensors = peft_tensors({"model.layers.0.mlp.down_proj": (FFN, DIM)})
    a = dict(peft_to_gguf.plan(CFG, tensors, tiny_base()).tensors)
    b = dict(peft_to_gguf.plan({**CFG, "fan_in_fan_out": True}, tensors, tiny_base()).tensors)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_bf16_safetensors_are_read_without_torch_exactly(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "adapter_model.safetensors"
    ref = {"a": torch.randn(3, 4).bfloat16(), "b": torch.randn(2), "c": torch.randn(5).half()}
    save_file(ref, str(path))
    got = peft_to_gguf._load_safetensors(path)
    for name, tensor in ref.items():
        assert got[name].dtype == np.float32
        assert np.array_equal(got[name], tensor.float().numpy()), name
    path.write_bytes(path.read_bytes()[:-4])  # cut: the last tensor's data is short
    for load in (peft_to_gguf._load_safetensors, peft_to_gguf._load_safetensors_bytes):
        with pytest.raises(EdgeTuneError, match="unreadable safetensors"):
            load(path)
