"""Adapters trained with a resized vocabulary are refused as such, for every layout PEFT and
Unsloth write after ``resize_token_embeddings`` / adding tokens, through the real
``edge-tune export``: exit 2, one line that says "resized vocabulary", the sizes, and the
route that works (PEFT's merge on a resized base + ``edge-tune convert-base``), never
``--merge`` (which keeps the base's embedding rows).

The adapters are small synthetic safetensors files on the tiny ``qwen2`` family (hidden 64,
tied embeddings), whose HF directory is the ``--base``; one case merges into its GGUF.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.helpers.cli import assert_one_line_error, run_cli
from tests.helpers.tiny_families import family_gguf, family_hf

HIDDEN, R, EXTRA = 64, 4, 8
PREFIX = "base_model.model."


def _vocab() -> int:
    return json.loads((family_hf("qwen2") / "config.json").read_text())["vocab_size"]


def _q_lora() -> dict:
    rng = np.random.default_rng(0)
    key = PREFIX + "model.layers.0.self_attn.q_proj"
    return {key + ".lora_A.weight": rng.normal(size=(R, HIDDEN)).astype(np.float32),
            key + ".lora_B.weight": rng.normal(size=(HIDDEN, R)).astype(np.float32) * 0.01}


def _rows(n: int) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, HIDDEN)).astype(np.float32)


def _layout(name: str, vocab: int) -> tuple[dict, dict, dict]:
    """(extra adapter_config fields, tensors, files beside the adapter) of one layout."""
    n = vocab + EXTRA
    if name == "modules_to_save":  # PEFT/Unsloth: full copies of both layers
        return ({"modules_to_save": ["embed_tokens", "lm_head"]},
                {PREFIX + "model.embed_tokens.weight": _rows(n),
                 PREFIX + "lm_head.weight": _rows(n)}, {})
    if name == "peft_0_22_modules_to_save":  # what PEFT 0.22 writes (read from a real save)
        keys = [f"{PREFIX}{m}.{part}weight" for m in ("model.embed_tokens", "lm_head")
                for part in ("modules_to_save.", "original_module.", "")]
        return ({"modules_to_save": ["embed_tokens", "lm_head"]},
                {k: _rows(vocab if "original_module" in k else n) for k in keys}, {})
    if name == "modules_to_save_unmerged_names":  # the wrapper's own names kept
        return ({"modules_to_save": ["embed_tokens"]},
                {PREFIX + "model.embed_tokens.modules_to_save.default.weight": _rows(n)}, {})
    if name == "save_embedding_layers":  # PEFT saves the resized embedding on its own
        return ({}, {PREFIX + "model.embed_tokens.weight": _rows(n)}, {})
    if name == "lm_head_in_safetensors":
        return ({}, {PREFIX + "lm_head.weight": _rows(n)}, {})
    if name == "embedding_lora_base_layer":  # embed_tokens as a LoRA target, resized
        return ({"target_modules": ["q_proj", "embed_tokens"]},
                {PREFIX + "model.embed_tokens.base_layer.weight": _rows(n),
                 PREFIX + "model.embed_tokens.lora_embedding_A": np.zeros((R, n), np.float32),
                 PREFIX + "model.embed_tokens.lora_embedding_B": np.zeros((HIDDEN, R),
                                                                          np.float32)}, {})
    if name == "trainable_token_indices":
        return ({"trainable_token_indices": [vocab, vocab + 1]},
                {PREFIX + "model.embed_tokens.token_adapter.trainable_tokens_delta":
                    _rows(2)}, {})
    if name == "unsloth_added_tokens_json":  # a plain LoRA beside a tokenizer with more tokens
        return ({}, {}, {"added_tokens.json": {"<|new_a|>": vocab, "<|new_b|>": n - 1}})
    if name == "unsloth_tokenizer_json":
        vocab_map = {f"t{i}": i for i in range(vocab)}
        return ({}, {}, {"tokenizer.json": {
            "model": {"type": "BPE", "vocab": vocab_map, "merges": []},
            "added_tokens": [{"id": vocab + i, "content": f"<|new{i}|>"}
                             for i in range(EXTRA)]}})
    raise KeyError(name)


def _adapter(tmp_path, name: str, vocab: int):
    extra_cfg, tensors, files = _layout(name, vocab)
    from safetensors.numpy import save_file

    d = tmp_path / name
    d.mkdir()
    cfg = {"peft_type": "LORA", "r": R, "lora_alpha": 8, "target_modules": ["q_proj"],
           "base_model_name_or_path": str(family_hf("qwen2")), **extra_cfg}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({**_q_lora(), **tensors}, str(d / "adapter_model.safetensors"))
    for fname, doc in files.items():
        (d / fname).write_text(json.dumps(doc))
    return d


LAYOUTS = ["modules_to_save", "peft_0_22_modules_to_save", "modules_to_save_unmerged_names",
           "save_embedding_layers", "lm_head_in_safetensors", "embedding_lora_base_layer", "trainable_token_indices",
           "unsloth_added_tokens_json", "unsloth_tokenizer_json"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_names_a_resized_vocabulary(layout, tmp_path):
    vocab = _vocab()
    adapter = _adapter(tmp_path, layout, vocab)
    out = tmp_path / "a.gguf"
    proc = run_cli("export", str(adapter), "--base", str(family_hf("qwen2")), "-o", str(out),
                   timeout=300)
    n = vocab + 2 if layout == "trainable_token_indices" else vocab + EXTRA
    assert_one_line_error(proc, "resized vocabulary", f"{n} tokens vs the base's {vocab}",
                          f"resize_token_embeddings({n})", "merge_and_unload()",
                          "edge-tune convert-base DIR")
    assert "--merge`" not in proc.stderr  # the route that cannot work is not suggested
    assert not out.exists()


def test_merge_names_a_resized_vocabulary(tmp_path):
    vocab = _vocab()
    adapter = _adapter(tmp_path, "modules_to_save", vocab)
    out = tmp_path / "m.gguf"
    proc = run_cli("export", str(adapter), "--base", str(family_gguf("qwen2")), "--merge",
                   "-o", str(out), timeout=300)
    assert_one_line_error(proc, "resized vocabulary", f"{vocab + EXTRA} tokens vs the base's "
                          f"{vocab}", "edge-tune convert-base DIR")
    assert not out.exists()


def test_copies_of_the_base_vocabulary_are_not_called_resized(tmp_path):
    """modules_to_save copies with the base's own rows: the --merge route, which works."""
    from safetensors.numpy import save_file

    vocab = _vocab()
    d = tmp_path / "same"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": R, "lora_alpha": 8, "target_modules": ["q_proj"],
         "modules_to_save": ["embed_tokens"]}))
    save_file({**_q_lora(), PREFIX + "model.embed_tokens.weight": _rows(vocab)},
              str(d / "adapter_model.safetensors"))
    proc = run_cli("export", str(d), "--base", str(family_hf("qwen2")), "-o",
                   str(tmp_path / "a.gguf"), timeout=300)
    assert_one_line_error(proc, "modules_to_save", "--merge")
    assert "resized" not in proc.stderr


def test_the_route_the_refusal_names_works(tmp_path):
    """A real PEFT save after ``resize_token_embeddings`` (PEFT's ``save_embedding_layers``
    writes the resized embedding and lm_head): ``export`` refuses it; the route it names
    (resize the HF base, ``PeftModel.from_pretrained`` + ``merge_and_unload()``, convert)
    gives a GGUF whose llama.cpp logits match PEFT's, the new tokens included. The conversion
    is ``tiny_families.convert``: llama.cpp's converter as ``convert-base`` runs it, with the
    tiny tokenizer's pre-tokenizer named (llama.cpp's table knows only real tokenizers)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from tests.helpers.tiny_families import convert
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_tune.llama.engine import Engine

    base = family_hf("qwen2")
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(["<|new_a|>", "<|new_b|>"], special_tokens=True)
    vocab, n = _vocab(), len(tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(n)
    with torch.no_grad():  # trained rows for the new tokens: not what a fresh resize gives
        model.get_input_embeddings().weight[vocab:] = torch.randn(n - vocab, HIDDEN) * 0.3
    tuned = get_peft_model(model, LoraConfig(r=R, lora_alpha=8, target_modules=["q_proj"],
                                             init_lora_weights=False))
    tuned.save_pretrained(tmp_path / "adapter")
    tokens = [1, 5, vocab, 40, vocab + 1, 7]
    with torch.no_grad():
        want = tuned(torch.tensor([tokens])).logits[0].numpy()

    proc = run_cli("export", str(tmp_path / "adapter"), "--base", str(base), timeout=300)
    assert_one_line_error(proc, "resized vocabulary", f"{n} tokens vs the base's {vocab}")

    resized = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    resized.resize_token_embeddings(n)
    merged = PeftModel.from_pretrained(resized, tmp_path / "adapter").merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    tok.save_pretrained(tmp_path / "merged")
    gguf = convert("qwen2", tmp_path / "merged", tmp_path / "merged.gguf")
    with Engine(gguf, n_ctx=64, logits_all=True, exact=True) as eng:
        got = eng.logits(tokens)
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
