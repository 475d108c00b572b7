"""The cpu backend's attention: transformers' eager attention, keeping one copy of the
probabilities for backward instead of two.

transformers' eager attention takes the softmax in fp32 and casts the result to the model's
dtype. Under bf16 autograd then keeps both: the fp32 probabilities (softmax's backward needs
its output) and their bf16 copy (the product with V needs it): batch x heads x L x L, six
bytes per entry, in every layer until backward. Here the softmax runs on the bf16 scores
directly (torch's CPU kernel accumulates in fp32 inside; the scores are bf16 in eager
attention already), so only the bf16 probabilities are kept: on the throughput benchmark's
largest batch that is 235 MiB less held per step, and no slower (see the README's Speed).

The arithmetic is eager attention's otherwise (grouped K/V repeated, scaling, Gemma 2's
soft-capping, the additive mask transformers builds for eager), so it is used only for the
families whose attention is exactly that; any other keeps "eager". torch and transformers
are imported inside functions.
"""

from __future__ import annotations

NAME = "edge_tune_eager"

# model_type values whose attention is eager_attention_forward's arithmetic (no sinks, no
# extra terms); everything else trains with transformers' own "eager".
FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                      "phi3", "smollm3", "granite", "olmo2"})


def implementation(model_type: str) -> str:
    """The ``attn_implementation`` to load a model of ``model_type`` with for training."""
    return NAME if model_type in FAMILIES and _register() else "eager"


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
              softcap=None, **_):
    """(output, None) with eager attention's signature; query/key/value are
    (batch, heads, length, head_dim), the mask additive and 4-D (or None)."""
    import torch

    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each K/V head serves ``groups`` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = module.head_dim ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        # In the scores' dtype: an fp32 mask would promote the scores (and the kept
        # probabilities) back to fp32. Masked entries become -inf; every row keeps at least
        # its own position, so no row is all -inf.
        scores = scores + attention_mask[..., :key.shape[-2]].to(scores.dtype)
    probs = torch.softmax(scores, dim=-1)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


_registered: list[bool] = []


def _register() -> bool:
    """Make NAME known to transformers, with eager's mask (a name transformers has no mask
    function for gets no mask at all, which would silently drop causality)."""
    if not _registered:
        try:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, eager_mask
        except ImportError:  # an older transformers: its own eager attention, then
            _registered.append(False)
        else:
            AttentionInterface.register(NAME, attention)
            AttentionMaskInterface.register(NAME, eager_mask)
            _registered.append(True)
    return _registered[0]
