"""Quantize a GGUF with llama.cpp's own quantizer, as llama-cpp-python exposes it.

``llama_cpp.llama_model_quantize`` is the same code as llama.cpp's ``llama-quantize`` tool, so
no separate llama.cpp build, no git clone and no network are needed, and the quantized file is
exactly what the runtime that serves it expects.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge_tune.errors import Unsupported, UsageError

# Types llama.cpp quantizes without an importance matrix (IQ1/IQ2/IQ3_XXS and Q2_K_S need one;
# without it llama.cpp refuses or writes a broken model), by name as users write them.
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0",
               "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K",
               "IQ4_NL", "IQ4_XS")

# Bytes per weight, roughly, for the disk-space estimate (block overheads included).
BITS_PER_WEIGHT = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.6, "Q5_K_M": 5.7,
                   "Q5_K_S": 5.5, "Q5_1": 6, "Q5_0": 5.5, "Q4_K_M": 4.9, "Q4_K_S": 4.6,
                   "Q4_1": 5, "Q4_0": 4.5, "Q3_K_L": 4.3, "Q3_K_M": 3.9, "Q3_K_S": 3.5,
                   "Q2_K": 3.4, "IQ4_NL": 4.5, "IQ4_XS": 4.3}


def normalize(quant: str) -> str:
    """``q4_k_m`` -> ``Q4_K_M``; one-line error for anything llama.cpp cannot do unaided."""
    name = quant.strip().upper().replace("-", "_")
    if name not in QUANT_TYPES:
        raise UsageError("unsupported quantization type; expected one "
                         f"of {', '.join(QUANT_TYPES)}", setting="quant", value=repr(quant))
    return name


def ftype(name: str) -> int:
    import llama_cpp

    return int(getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if name == "F32"
                       else f"LLAMA_FTYPE_MOSTLY_{name}"))


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None) -> Path:
    """Quantize the (F32/F16) GGUF ``src`` into ``dst`` with llama.cpp. ``dst`` is written by
    llama.cpp directly: callers pass a temporary path and rename it on success."""
    try:
        import llama_cpp
    except ImportError:
        raise UsageError("needs llama-cpp-python: pip install 'edge-tune[run]'",
                         setting="quant") from None
    name = normalize(quant)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype(name)
    params.nthread = threads or os.cpu_count() or 1
    from edge_tune.native_log import quiet_stderr

    with quiet_stderr():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not Path(dst).is_file():
        Path(dst).unlink(missing_ok=True)
        raise Unsupported(f"{src}: llama.cpp could not quantize it to {name} (code {rc}; "
                          "EDGE_TUNE_DEBUG=1 shows llama.cpp's log)")
    return Path(dst)
