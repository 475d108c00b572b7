"""HF module names -> GGUF tensor names, and the rope row permutation of q/k.

Pure logic, no I/O. The name map is gguf-py's own tensor map, so every architecture gguf knows
is covered without a hand-kept table.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional

import numpy as np

# HF ``model_type`` -> GGUF ``general.architecture``, where they differ or need stating.
HF_TO_GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",  # llama.cpp converts Mistral checkpoints to the llama arch
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "granite": "granite",
}

# GGUF archs whose HF -> GGUF conversion permutes the rows of q/k for llama.cpp's rope layout
# (convert_hf_to_gguf.py LlamaModel.permute). LoRA B matrices of q_proj/k_proj must be
# permuted the same way, or the adapter's effect on attention is scrambled (~70% off).
ROPE_PERMUTED_ARCHS = frozenset({"llama", "granite"})

_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\."
    r"(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.default)?(?:\.weight)?$"
)


def gguf_arch(model_type: str) -> str:
    return HF_TO_GGUF_ARCH.get(model_type, model_type)


def split_peft_key(key: str) -> Optional[tuple[str, str]]:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` ->
    (``model.layers.0.self_attn.q_proj``, ``lora_A``); None if it is not a LoRA tensor."""
    m = _PEFT_KEY.match(key)
    return (m.group("module"), m.group("part")) if m else None


@lru_cache(maxsize=32)
def _tensor_map(arch: str, n_blocks: int):
    import gguf

    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise KeyError(f"architecture {arch!r} is unknown to gguf")
    return gguf.get_tensor_name_map(by_name[arch], n_blocks)


def gguf_tensor_name(module: str, arch: str, n_blocks: int) -> Optional[str]:
    """HF module name -> GGUF weight name (``blk.3.attn_q.weight``), or None if unmapped."""
    name = _tensor_map(arch, n_blocks).get_name(module + ".weight", try_suffixes=(".weight",))
    return name


def rope_permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Permute the output rows of a q/k projection (or its LoRA B) the way llama.cpp's
    converter permutes the base weight: per head, HF's two rotary halves become
    interleaved pairs."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of even size")
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def needs_rope_permute(arch: str, gguf_name: str) -> Optional[str]:
    """'q' / 'k' when this tensor's rows must be permuted for ``arch``, else None."""
    if arch not in ROPE_PERMUTED_ARCHS:
        return None
    if gguf_name.endswith("attn_q.weight"):
        return "q"
    if gguf_name.endswith("attn_k.weight"):
        return "k"
    return None
