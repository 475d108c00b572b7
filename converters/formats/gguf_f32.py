"""Write an F32 copy of a GGUF: same metadata, every tensor dequantized with gguf's own code.

Used for exact comparisons (converter parity): on a quantized base, llama.cpp's activation
quantization adds ~1 logit of noise, which hides converter bugs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_tune.converters.formats.base_info import copy_fields, open_gguf, writing_gguf


def write_f32_copy(src: Path, dst: Path) -> Path:
    import gguf

    reader = open_gguf(src)
    arch = reader.fields["general.architecture"].contents()
    with writing_gguf(Path(dst), arch) as w:
        copy_fields(reader, w, skip={"general.file_type"})
        w.add_uint32("general.file_type", 0)  # ALL_F32
        for t in reader.tensors:
            data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            w.add_tensor(t.name, data.reshape(tuple(reversed([int(x) for x in t.shape]))))
    return Path(dst)
