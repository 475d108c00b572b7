"""Tiny bases and their exact torch twins, for the adapter tests.

A tiny F32 llama GGUF (``tiny_models.tiny_llama_gguf``, tied embeddings) and an untied copy
(its own ``output.weight``), plus the same weights as a transformers ``LlamaForCausalLM`` built
directly from the GGUF tensors (q/k rows un-permuted back to HF order). No tokenizer rebuild,
no dequantization: PEFT runs on exactly the numbers llama.cpp runs on, so (tuned − base)
logits of the two engines can be compared to float rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TOKENS = [1, 57, 2034, 311, 9, 4211, 88, 1503, 27, 640, 12, 3001]


def untied_copy(src: Path, dst: Path, seed: int = 7) -> Path:
    """``src`` (a tied F32 GGUF) with an ``output.weight`` of its own."""
    import gguf

    from edge_tune.converters.formats.base_info import open_gguf, writing_gguf

    reader = open_gguf(src)
    with writing_gguf(dst, "llama") as w:
        for key, f in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            sub = {"sub_type": f.types[-1]} if f.types[0] == gguf.GGUFValueType.ARRAY else {}
            w.add_key_value(key, f.contents(), f.types[0], **sub)
        for t in reader.tensors:
            w.add_tensor(t.name, np.asarray(t.data))
            if t.name == "token_embd.weight":
                rng = np.random.default_rng(seed)
                out = rng.standard_normal(np.asarray(t.data).shape).astype(np.float32) * 0.2
                w.add_tensor("output.weight", out)
    return Path(dst)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of names.rope_permute_rows: llama.cpp's q/k row order back to HF's."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def hf_twin(gguf_path: Path):
    """A float32 ``LlamaForCausalLM`` holding exactly the tiny GGUF's weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edge_tune.converters.formats.base_info import field_value, open_gguf

    reader = open_gguf(gguf_path)
    t = {x.name: np.asarray(x.data).reshape(tuple(reversed([int(d) for d in x.shape])))
         for x in reader.tensors}
    heads = int(field_value(reader, "llama.attention.head_count"))
    kv = int(field_value(reader, "llama.attention.head_count_kv"))
    hidden = int(field_value(reader, "llama.embedding_length"))
    blocks = int(field_value(reader, "llama.block_count"))
    tied = "output.weight" not in t
    vocab = t["token_embd.weight"].shape[0]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=blocks,
                      intermediate_size=int(field_value(reader, "llama.feed_forward_length")),
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                      rms_norm_eps=float(field_value(reader, "llama.attention.layer_norm_rms_epsilon")),
                      rope_theta=float(field_value(reader, "llama.rope.freq_base")),
                      max_position_embeddings=2048, tie_word_embeddings=tied,
                      architectures=["LlamaForCausalLM"])
    sd = {"model.embed_tokens.weight": t["token_embd.weight"],
          "model.norm.weight": t["output_norm.weight"]}
    if not tied:
        sd["lm_head.weight"] = t["output.weight"]
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for b in range(blocks):
        for g, h in names.items():
            w = t[f"blk.{b}.{g}.weight"]
            if g == "attn_q":
                w = _unpermute(w, heads)
            elif g == "attn_k":
                w = _unpermute(w, kv)
            sd[f"model.layers.{b}.{h}.weight"] = w
    model = LlamaForCausalLM(cfg).float().eval()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=False)
    assert not unexpected and all("lm_head" in k or "rotary" in k for k in missing), missing
    if tied:
        model.tie_weights()
    return model


def peft_adapter(model, out_dir: Path, tokens=TOKENS, seed: int = 0, a_scale: float = 0.5,
                 b_scale: float = 0.05, **lora_kw) -> tuple[np.ndarray, np.ndarray]:
    """A random non-zero PEFT adapter on ``model`` saved to ``out_dir``; returns PEFT's
    (tuned, base) logits on ``tokens`` with the adapter unmerged."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(init_lora_weights=False, **{"r": 4, "lora_alpha": 8, **lora_kw})
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_embedding_A" in name:
                p.mul_(a_scale)
            elif "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(b_scale)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.05 * torch.randn_like(p))
            elif "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
        ids = torch.tensor([list(tokens)])
        tuned = peft_model(ids).logits[0].double().numpy()
        with peft_model.disable_adapter():
            base = peft_model(ids).logits[0].double().numpy()
    peft_model.save_pretrained(str(out_dir))
    return tuned, base


def rel(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))
