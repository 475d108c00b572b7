"""Pure format code: GGUF adapters and headers, PEFT/mlx-lm LoRA tensors, merges, F32 copies.

Needs only numpy, the ``gguf`` package, safetensors and the standard library (plus edge-tune's
error, event and file-writing leaves); import-linter keeps torch, llama.cpp and the core out.
"""
