"""A LoRA GGUF with its A/B matrices in Q8_0: the serving copy of an adapter.

Why: ggml computes a Q8_0 matrix product with the same arithmetic for one row as for
several (its dot product and llamafile's Q8_0 sgemm agree bit for bit on x86; measured,
docs/serving.md), an F32 one not, so with Q8_0 adapters a lone sequence's decode step needs
no filler row (:mod:`edge_tune.batch_rows`). Q8_0 stores rows in blocks of 32, so the rank
is padded with zero rows of A and zero columns of B up to a multiple of 32; llama.cpp scales
each pair by ``alpha / rank`` with ``rank = B.ne[0]`` (when the adapter has an alpha), so B
is multiplied by ``padded / rank`` to keep ``alpha / rank * B A`` (Hu et al. 2021, eq. 4) the same up to
Q8_0's rounding. Format of the tensors: llama.cpp's ``convert_lora_to_gguf.py``
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


def write_q8_copy(src: Path, dst: Path) -> int:
    """Write ``src`` (a LoRA GGUF) to ``dst`` with every pair of :func:`q8_pairs` in Q8_0
    (rank padded to a multiple of 32, B rescaled: see the module); other tensors and every
    KV field as stored. Returns the pairs converted (0: ``dst`` is not written). Raises
    ValueError for a file that is not a whole GGUF."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize, quantize

    reader = open_gguf(src)
    pairs = q8_pairs(reader)
    if not pairs:
        return 0
    # llama.cpp divides by the rank only when the adapter has an alpha (llama-adapter.h)
    rescale = bool(field_value(reader, "adapter.lora.alpha", 0))
    converted = {}
    for base, (a, b) in pairs.items():
        # numpy orientation: A (rank, n_in), B (n_out, rank)
        A = dequantize(a.data, a.tensor_type).reshape(int(a.shape[1]), int(a.shape[0]))
        B = dequantize(b.data, b.tensor_type).reshape(int(b.shape[1]), int(b.shape[0]))
        rank = A.shape[0]
        padded = -(-rank // BLOCK) * BLOCK
        A = np.concatenate([A, np.zeros((padded - rank, A.shape[1]), np.float32)])
        B = np.concatenate([B * np.float32(padded / rank if rescale else 1.0),
                            np.zeros((B.shape[0], padded - rank), np.float32)], axis=1)
        converted[base + ".lora_a"] = quantize(A.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        converted[base + ".lora_b"] = quantize(B.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    with writing_gguf(dst, field_value(reader, "general.architecture")) as w:
        copy_fields(reader, w)
        for t in reader.tensors:
            q = converted.get(t.name)
            if q is None:
                w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
            else:
                w.add_tensor(t.name, q, raw_shape=q.shape,
                             raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    return len(pairs)
