"""Write small GGUF LoRA adapters by hand, for tests of the validator."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_adapter(path: Path, arch: str, tensors: dict[str, np.ndarray], alpha=16.0,
                  alpha_as_float32: bool = True) -> Path:
    import gguf

    from edge_tune.converters.formats.base_info import writing_gguf

    with writing_gguf(path, arch) as w:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        if alpha_as_float32:
            w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        else:
            w.add_uint32(gguf.Keys.Adapter.LORA_ALPHA, int(alpha))
        for name, arr in tensors.items():
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    return path


def q_pair(r: int = 4, n_in: int = 576, n_out: int = 576, block: int = 0) -> dict:
    """A lora pair for blk.N.attn_q.weight of the default model (numpy orientation)."""
    rng = np.random.default_rng(0)
    return {f"blk.{block}.attn_q.weight.lora_a": rng.normal(size=(r, n_in)) * 0.01,
            f"blk.{block}.attn_q.weight.lora_b": rng.normal(size=(n_out, r)) * 0.01}


def scaled_copy(src: Path, dst: Path, factor: float) -> Path:
    """A copy of a GGUF LoRA adapter with its alpha (so its effect) multiplied by ``factor``:
    a second, distinct adapter for the same base without training one."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    tensors = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist())))
               for t in reader.tensors}
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    return write_adapter(dst, arch, tensors, alpha=alpha * factor)


def retemplated(src: Path, dst: Path, template: str | None) -> Path:
    """A copy of GGUF ``src`` whose ``tokenizer.chat_template`` is ``template`` (None: none)."""
    from edge_tune.converters.formats.base_info import (copy_fields, field_value, open_gguf,
                                                        writing_gguf)

    reader = open_gguf(src)
    with writing_gguf(dst, field_value(reader, "general.architecture")) as w:
        copy_fields(reader, w, skip={"tokenizer.chat_template"})
        if template is not None:
            w.add_chat_template(template)
        for t in reader.tensors:  # as stored (quantized blocks too)
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    return dst
