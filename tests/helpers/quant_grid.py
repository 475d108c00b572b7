"""A base already on llama.cpp's Q4_0 grid and small adapter deltas: the deterministic
degraded merge of the quantized-export checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np


DELTA_RMS = 8e-4  # of each matrix's merged change scale * B @ A


def _grid_base(tiny: Path, tiny_hf: Path, dst: Path) -> Path:
    """``tiny`` with every matrix rounded to the Q4_0 grid (gguf-py's reference quantizer),
    written as F32; its dequantized HF copy is seeded into the cache from ``tiny_hf`` with
    the same rounding (rows are blocks in both layouts; q/k are only permuted by rows), so
    training does not rebuild the tokenizer (~40 s). Verify's checks compare the two."""
    import gguf
    from safetensors.numpy import load_file, save_file

    from edge_tune.converters.formats.base_info import copy_fields, field_value, open_gguf, \
        writing_gguf
    from edge_tune.fsutil import cache_dir, sha256_file

    def grid(x: np.ndarray) -> np.ndarray:
        if x.ndim != 2:
            return x
        q4 = gguf.GGMLQuantizationType.Q4_0
        return gguf.quants.dequantize(gguf.quants.quantize(x.astype(np.float32), q4),
                                      q4).reshape(x.shape).astype(np.float32)

    src = open_gguf(tiny)
    with writing_gguf(dst, field_value(src, "general.architecture")) as w:
        copy_fields(src, w)
        for t in src.tensors:
            data = np.asarray(t.data, np.float32).reshape(tuple(reversed([int(s) for s in
                                                                          t.shape])))
            w.add_tensor(t.name, grid(data))
    target = cache_dir() / "hf" / sha256_file(dst)[:16]
    if not (target / "config.json").is_file():
        tmp = target.with_name(target.name + ".seed")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(tiny_hf, tmp)
        weights = load_file(str(tmp / "model.safetensors"))
        save_file({k: grid(v) for k, v in weights.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "edge_tune_source.json").write_text(json.dumps({"gguf": str(dst)}))
        tmp.rename(target)
    return dst


def _error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    return lines[0]
