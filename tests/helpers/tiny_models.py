"""Tiny random Llama models, built locally as GGUF files with the default model's tokenizer.

A GGUF is the one file every engine here reads: llama.cpp runs it, transformers dequantizes it
into the HF copy that torch and mlx train on (``models.dequantized_copy``). Keeping the real
SmolLM2 tokenizer and chat template means the data pipeline is exercised exactly as for the
default model, while a forward pass costs almost nothing (hidden 64, 2 blocks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHAPE = dict(hidden=64, blocks=2, heads=4, kv_heads=2, ffn=128)


def tiny_llama_gguf(dst: Path, tokenizer_from: Path, seed: int = 0, **shape) -> Path:
    """Write a random F32 Llama GGUF at ``dst`` carrying ``tokenizer_from``'s tokenizer."""
    import gguf

    from edge_tune.converters.formats.base_info import open_gguf, writing_gguf

    s = {**SHAPE, **shape}
    hidden, heads, kv_heads = s["hidden"], s["heads"], s["kv_heads"]
    head_dim = hidden // heads
    reader = open_gguf(tokenizer_from)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    rng = np.random.default_rng(seed)

    def rand(*shape_, std=0.08):
        return (rng.standard_normal(shape_) * std).astype(np.float32)

    with writing_gguf(Path(dst), "llama") as w:
        for key, f in reader.fields.items():
            if key.startswith("tokenizer.") and key != "tokenizer.ggml.tokens.count":
                vtype = f.types[0]
                if vtype == gguf.GGUFValueType.ARRAY:
                    w.add_key_value(key, f.contents(), vtype, sub_type=f.types[-1])
                else:
                    w.add_key_value(key, f.contents(), vtype)
        w.add_name("tiny-llama")
        w.add_file_type(0)
        w.add_block_count(s["blocks"])
        w.add_context_length(2048)
        w.add_embedding_length(hidden)
        w.add_feed_forward_length(s["ffn"])
        w.add_head_count(heads)
        w.add_head_count_kv(kv_heads)
        w.add_rope_freq_base(10000.0)
        w.add_rope_dimension_count(head_dim)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_vocab_size(vocab)
        # Tied output layer: a larger scale lets the model become confident (logits = h . e,
        # with |h| fixed by the final RMS norm), so a few LoRA steps visibly change answers.
        w.add_tensor("token_embd.weight", rand(vocab, hidden, std=0.2))
        w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
        for b in range(s["blocks"]):
            p = f"blk.{b}."
            w.add_tensor(p + "attn_norm.weight", np.ones(hidden, np.float32))
            w.add_tensor(p + "ffn_norm.weight", np.ones(hidden, np.float32))
            w.add_tensor(p + "attn_q.weight", rand(heads * head_dim, hidden))
            w.add_tensor(p + "attn_k.weight", rand(kv_heads * head_dim, hidden))
            w.add_tensor(p + "attn_v.weight", rand(kv_heads * head_dim, hidden))
            w.add_tensor(p + "attn_output.weight", rand(hidden, heads * head_dim))
            w.add_tensor(p + "ffn_gate.weight", rand(s["ffn"], hidden))
            w.add_tensor(p + "ffn_up.weight", rand(s["ffn"], hidden))
            w.add_tensor(p + "ffn_down.weight", rand(hidden, s["ffn"]))
    return Path(dst)


def tiny_adapter(dst: Path, seed: int = 1, alpha: float = 64.0) -> Path:
    """A strong random GGUF LoRA (rank 4, on attn_q and attn_v of every block) for a
    :func:`tiny_llama_gguf` model: it visibly changes greedy answers."""
    from tests.helpers.gguf_helpers import write_adapter

    rng = np.random.default_rng(seed)
    h = SHAPE["hidden"]
    kv = SHAPE["kv_heads"] * h // SHAPE["heads"]
    pairs = {}
    for b in range(SHAPE["blocks"]):
        for name, out in (("attn_q", h), ("attn_v", kv)):
            pairs[f"blk.{b}.{name}.weight.lora_a"] = rng.normal(size=(4, h))
            pairs[f"blk.{b}.{name}.weight.lora_b"] = rng.normal(size=(out, 4))
    return write_adapter(Path(dst), "llama", pairs, alpha=alpha)
