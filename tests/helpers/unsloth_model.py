"""A tiny random PEFT Llama with the unsloth backend's LoRA settings, and a training config."""

from __future__ import annotations

from edge_tune.config import TrainConfig
from edge_tune.training.backends import unsloth as uq


def config(**kw) -> dict:
    return TrainConfig(data="x.jsonl", **kw).to_dict()


def tiny_peft_llama(seed: int = 0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=128,
                                         # large weights: the random model can get confident
                                         initializer_range=0.3))
    kw = uq.peft_kwargs(config(rank=8, alpha=16.0))
    return get_peft_model(model, LoraConfig(
        task_type="CAUSAL_LM", **{k: v for k, v in kw.items()
                                  if k not in ("use_gradient_checkpointing", "random_state")}))
