"""How llama.cpp *computes* with a GGUF LoRA, per architecture: which base tensors an adapter may
touch, and what llama.cpp does with each pair. The loader's own checks are in ``validate``;
this module covers what the loader lets through and the graph then aborts on or computes
differently from PEFT.

Source (llama.cpp as bundled in llama-cpp-python 0.3.36):

* ``src/llama-graph.cpp`` ``build_lora_mm``: for a matmul weight ``W`` the graph computes
  ``W x + s · B (A x)`` with ``s = user_scale · alpha / rank`` and ``rank = lora_b.ne[0]``
  (``llama-adapter.h`` ``get_scale``; alpha 0 means ``s = user_scale``). Used for every
  attention/FFN projection (``build_qkv``, ``build_attn``, ``build_ffn``) and the output layer.
* ``build_inp_embd``: a ``token_embd`` LoRA adds ``s · B · get_rows(A, tokens)`` (A stored
  transposed) to the input embeddings only.
* ``src/models/<arch>.cpp``: with no ``output.weight`` the output layer *is* ``token_embd``
  (``TENSOR_DUPLICATED``; gemma/gemma2 always). ``build_lora_mm(model.output, ...)`` then finds
  the embedding's LoRA under that name and multiplies ``A (r x vocab)`` by the hidden state:
  ``GGML_ASSERT(ggml_can_mul_mat(a, b))``, the process aborts (exit 134). PEFT applies an
  embedding LoRA to the input only, so no GGUF form computes it on a tied base.
* Norm vectors in an adapter are skipped by the loader; LoRA pairs on tensors no graph op
  passes through ``build_lora_mm`` (norms, biases, rope factors, experts) load and are ignored.
"""

from __future__ import annotations

import re
from typing import Optional

# Per-block weights every supported architecture multiplies through build_lora_mm.
MATMUL_KINDS = frozenset({"attn_q", "attn_k", "attn_v", "attn_output", "attn_qkv",
                          "ffn_gate", "ffn_up", "ffn_down"})

# The graphs read for these rules: llama (also Mistral's and Granite's checkpoints), qwen2,
# qwen3, gemma2, gemma3, phi3. Each multiplies every MATMUL_KINDS tensor its base carries, and
# the output layer, through build_lora_mm; phi3 fuses q/k/v into attn_qkv and gate/up into
# ffn_up (2 x n_ff rows, gate first, as HF's gate_up_proj), so PEFT's qkv_proj / gate_up_proj
# LoRA maps one to one. Other architectures get the same rules, unverified.

# Architectures whose output layer is token_embd even when a file carries output.weight.
ALWAYS_TIED_ARCHS = frozenset({"gemma", "gemma2", "cohere2", "command-r", "openelm", "plm"})

# ggml types an adapter tensor may have: what mul_mat and get_rows take on every backend, and
# what llama.cpp's own convert_lora_to_gguf.py writes (f32, f16, bf16, q8_0).
TENSOR_TYPES = frozenset({"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"})

_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.weight$")

MERGE_ROUTE = ("merge the PEFT adapter into the base instead (`edge-tune export ADAPTER_DIR "
               "--base BASE.gguf --merge`, then chat with the merged GGUF)")


def output_is_token_embd(arch: str, tied_embeddings: bool) -> bool:
    """Whether llama.cpp's output layer for this base is the ``token_embd`` tensor itself."""
    return tied_embeddings or arch in ALWAYS_TIED_ARCHS


def merge_can_untie(arch: str) -> bool:
    """A merge can give a tied base its own ``output.weight`` only where llama.cpp reads one."""
    return arch not in ALWAYS_TIED_ARCHS


def untie_route(arch: str) -> str:
    """What works for a change to a tied embedding/output on ``arch`` (a refusal's advice)."""
    if merge_can_untie(arch):
        return MERGE_ROUTE
    return (f"llama.cpp's {arch} always uses the embedding as the output layer, so neither a "
            "GGUF adapter nor a merge computes this; serve the PEFT adapter with vLLM "
            "(`edge-tune export ADAPTER_DIR --vllm DIR`) or retrain without embed_tokens/lm_head")


def graph_problem(target: str, arch: str, tied_embeddings: bool) -> Optional[str]:
    """Why llama.cpp's graph would abort on, or silently ignore, a LoRA pair on ``target`` (a
    base tensor name), or None when it computes what PEFT does. Pure."""
    if target == "token_embd.weight":
        if output_is_token_embd(arch, tied_embeddings):
            return (f"tensor 'token_embd.weight': an embedding LoRA cannot run on this base: its "
                    f"output layer is the embedding (tied), and llama.cpp applies the LoRA there "
                    f"too and aborts; {untie_route(arch)}")
        return None
    if target == "output.weight":
        return None
    m = _BLOCK.match(target)
    if m and m.group(2) in MATMUL_KINDS:
        return None
    what = "a norm vector" if "norm" in target else "a tensor no matmul of llama.cpp's " \
        "graph applies a LoRA to"
    return (f"tensor {target!r} is {what}: llama.cpp would load this LoRA pair and ignore it "
            f"(expected attention/FFN projections, token_embd or output); {MERGE_ROUTE}")
