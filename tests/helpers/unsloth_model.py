"""A tiny random PEFT Llama with the unsloth backend's LoRA settings, a training config, a
tokenizer for TRL's ``processing_class``, and a policy moved off its reference."""

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


def tiny_tokenizer():
    """A real tokenizer object for TRL's ``processing_class`` (its pad id is all it reads)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(64)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
        pad_token="t0", eos_token="t2")


def move_adapter(model) -> None:
    """Random non-zero LoRA B of the trained ("default") adapter: policy != reference."""
    import torch

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
