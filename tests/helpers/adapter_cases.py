"""Adapter GGUFs built tensor by tensor for the crash-proofing tests: a ``Case`` (what
llama.cpp does with it and what it holds), LoRA pairs for the tiny llama's projections, and
the writer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


KINDS = {  # GGUF kind -> (n_in, n_out) of the tiny llama (hidden 64, 4 heads, 2 KV heads, ffn 128)
    "attn_q": (64, 64), "attn_k": (64, 32), "attn_v": (64, 32), "attn_output": (64, 64),
    "ffn_gate": (64, 128), "ffn_up": (64, 128), "ffn_down": (128, 64),
}


@dataclass
class Case:
    id: str
    ok: bool  # what llama.cpp does: True = loads and computes the LoRA like PEFT
    tensors: dict = field(default_factory=dict)  # name -> numpy array (or (array, ggml type))
    alpha: object = ("f32", 16.0)
    arch: str | None = "llama"
    kv: dict = field(default_factory=dict)  # extra/overriding string KV
    raw: bytes | None = None  # write these bytes instead of a GGUF


def pair(kind: str, block: int = 0, r: int = 4, seed: int = 0, n_in=None, n_out=None) -> dict:
    rng = np.random.default_rng(seed)
    i, o = KINDS[kind]
    n_in, n_out = n_in or i, n_out or o
    name = f"blk.{block}.{kind}.weight"
    return {name + ".lora_a": rng.normal(size=(r, n_in)).astype(np.float32) * 0.3,
            name + ".lora_b": rng.normal(size=(n_out, r)).astype(np.float32) * 0.3}


def write_case(case: Case, path: Path) -> Path:
    import gguf

    from edge_tune.converters.formats.base_info import writing_gguf

    if case.raw is not None:
        path.write_bytes(case.raw)
        return path
    with writing_gguf(path, case.arch) as w:
        kv = {"general.type": "adapter", "adapter.type": "lora", **case.kv}
        for key, value in kv.items():
            if value is None:
                continue
            if isinstance(value, list):
                w.add_array(key, value)
            else:
                w.add_string(key, value)
        kind, value = case.alpha
        key = gguf.Keys.Adapter.LORA_ALPHA
        adders = {"f32": w.add_float32, "u32": w.add_uint32, "i32": w.add_int32,
                  "f64": w.add_float64, "str": w.add_string, "bool": w.add_bool,
                  "u8": w.add_uint8, "i64": w.add_int64, "array": w.add_array}
        if kind != "missing":
            adders[kind](key, value)
        for name, arr in case.tensors.items():
            gtype = "F32"
            if isinstance(arr, tuple):
                arr, gtype = arr
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            if gtype == "F32":
                w.add_tensor(name, arr)
            elif gtype == "F16":
                w.add_tensor(name, arr.astype(np.float16))
            elif gtype == "F64":
                w.add_tensor(name, arr.astype(np.float64))
            elif gtype in ("I32", "I8", "I16"):
                w.add_tensor(name, (arr * 100).astype(getattr(np, "int" + gtype[1:])))
            else:
                qt = gguf.GGMLQuantizationType[gtype]
                w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
    return path
