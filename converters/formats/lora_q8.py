"""A LoRA GGUF with its A/B matrices in Q8_0: the serving copy of an adapter.

Why: ggml computes a Q8_0 matrix product with the same arithmetic for one row as for
several (its dot product and llamafile's Q8_0 sgemm agree bit for bit on x86; measured,
docs/serving.md), an F32 one not, so with Q8_0 adapters a lone sequence's decode step needs
no filler row (:mod:`edge_tune.llama.batch_rows`). Q8_0 stores rows in blocks of 32, so the rank
is padded with zero rows of A and zero columns of B up to a multiple of 32; llama.cpp scales
each pair by ``alpha / rank`` with ``rank = B.ne[0]`` (by 1 without an alpha), so B and
alpha are rescaled to keep ``alpha / rank * B A`` (Hu et al. 2021, eq. 4) the same up to
Q8_0's rounding (:func:`write_q8_copy`). An adapter with a pair that cannot be stored so
(the token embedding, which llama.cpp reads by rows; an input width not a multiple of 32)
is served as it is. Format of the tensors: llama.cpp's ``convert_lora_to_gguf.py``
(``<base tensor>.lora_a``: ne ``[n_in, rank]``, ``.lora_b``: ne ``[rank, n_out]``).
"""

from __future__ import annotations

from pathlib import Path

from edge_tune.converters.formats.base_info import (copy_fields, field_value, open_gguf,
                                                    writing_gguf)

BLOCK = 32  # Q8_0 block length (ggml-common.h QK8_0)


def q8_pairs(reader) -> dict[str, tuple]:
    """{base tensor name: (lora_a tensor, lora_b tensor)} of the pairs a Q8_0 copy converts:
    matrix products whose input width is a multiple of 32 (not the token embedding, which
    llama.cpp reads by rows)."""
    tensors = {t.name: t for t in reader.tensors}
    pairs = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        base = name[:-len(".lora_a")]
        b = tensors.get(base + ".lora_b")
        if b is None or base.startswith("token_embd") or int(a.shape[0]) % BLOCK:
            continue
        pairs[base] = (a, b)
    return pairs


def _power_of_two(x: float) -> float:
    """The power of two nearest ``x`` (1 for 0): scaling by it is exact in floating point."""
    import math

    return 2.0 ** round(math.log2(x)) if x > 0 else 1.0


def write_q8_copy(src: Path, dst: Path) -> int:
    """Write ``src`` (a LoRA GGUF) to ``dst`` with its pairs in Q8_0 (see the module);
    other tensors and every other KV field as stored. Returns the pairs converted; 0 when
    some pair cannot be stored in Q8_0 (then ``dst`` is not written: the adapter is served
    as it is). Raises EdgeTuneError (one line) for a file that is not a whole GGUF.

    Scales: Q8_0 keeps one F16 scale per block of 32, so values whose block maximum is far
    below 1e-2 lose precision (F16 subnormals); a barely trained adapter's B is that small.
    Each A is scaled by a power of two to a maximum near 1, and the magnitude moves into a
    new ``adapter.lora.alpha`` (a power of two near the pairs' median B maximum), so that
    llama.cpp's ``alpha' / padded_rank * B' A'`` equals the original ``scale * B A``
    (``scale`` = ``alpha / rank``, or 1 without an alpha)."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize, quantize

    reader = open_gguf(src)
    pairs = q8_pairs(reader)
    if not pairs or len(pairs) != sum(t.name.endswith(".lora_a") for t in reader.tensors):
        return 0
    alpha = float(field_value(reader, "adapter.lora.alpha", 0) or 0)
    scaled = {}
    for base, (a, b) in pairs.items():
        # numpy orientation: A (rank, n_in), B (n_out, rank); scale * B A == B1 A1
        A = dequantize(a.data, a.tensor_type).reshape(int(a.shape[1]), int(a.shape[0]))
        B = dequantize(b.data, b.tensor_type).reshape(int(b.shape[1]), int(b.shape[0]))
        rank = A.shape[0]
        to_one = _power_of_two(float(np.abs(A).max()))
        scale = alpha / rank if alpha else 1.0
        scaled[base] = (A / np.float32(to_one), B * np.float32(scale * to_one),
                        -(-rank // BLOCK) * BLOCK)
    maxima = [float(np.abs(B1).max()) * padded for _, B1, padded in scaled.values()]
    new_alpha = _power_of_two(float(np.median([m for m in maxima if m > 0] or [0.0])))
    converted = {}
    for base, (A1, B1, padded) in scaled.items():
        rank = A1.shape[0]
        A2 = np.concatenate([A1, np.zeros((padded - rank, A1.shape[1]), np.float32)])
        B2 = np.concatenate([B1 * np.float32(padded / new_alpha),
                             np.zeros((B1.shape[0], padded - rank), np.float32)], axis=1)
        for suffix, m in ((".lora_a", A2), (".lora_b", B2)):
            converted[base + suffix] = quantize(m.astype(np.float32),
                                                gguf.GGMLQuantizationType.Q8_0)
    with writing_gguf(dst, field_value(reader, "general.architecture")) as w:
        copy_fields(reader, w, skip={"adapter.lora.alpha"})
        w.add_float32("adapter.lora.alpha", new_alpha)
        for t in reader.tensors:
            q = converted.get(t.name)
            if q is None:
                w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
            else:
                w.add_tensor(t.name, q, raw_shape=q.shape,
                             raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    return len(pairs)
