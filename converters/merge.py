"""Merge a PEFT LoRA adapter into a GGUF base: one GGUF with the base's metadata, tokenizer and
chat template, and weights ``W + scale·B·A`` (DoRA: ``m/‖W + scale·B·A‖ · (W + scale·B·A)``).

Streamed tensor by tensor: the base is memory-mapped, each tensor is dequantized with gguf-py's
own code, the delta added, and the result written before the next is read, so peak memory is
about one tensor plus the adapter, not the model.

Layouts: the base GGUF of a llama-family model holds q/k rows in llama.cpp's rope order, while
PEFT's deltas are in HF order. The delta's rows are permuted exactly as
:func:`edge_tune.converters.names.rope_permute_rows` permutes LoRA B for a GGUF adapter (it is
the same linear map on rows, so permuting B or B·A is the same thing). Everything else about
scales (rsLoRA, rank/alpha patterns) is PEFT's own rule, shared with ``peft_to_gguf``.
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from edge_tune.converters.base_info import BaseInfo, field_value, from_gguf, open_gguf
from edge_tune.converters.names import (
    gguf_tensor_name,
    needs_rope_permute,
    split_peft_key,
)
from edge_tune.converters.peft_to_gguf import _module_scale

from edge_tune.errors import EdgeTuneError
from edge_tune.events import EventSink, Progress, ignore

FILE_TYPE = {"F32": 0, "F16": 1}  # general.file_type (llama_ftype) of what merge writes


@dataclass
class Delta:
    """One base tensor's change, in HF orientation: ``scale · B @ A`` (rows = outputs)."""

    a: np.ndarray
    b: np.ndarray
    scale: float
    embedding: bool = False  # PEFT embedding LoRA: delta = (B @ A).T
    magnitude: np.ndarray | None = None  # DoRA: per-output-row magnitude
    permute_heads: int = 0  # llama rope layout: permute rows with this many heads

    def dense(self) -> np.ndarray:
        d = (self.b.astype(np.float64) @ self.a.astype(np.float64)) * self.scale
        return d.T if self.embedding else d


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k row order -> llama.cpp's (the base GGUF's). Same map as ``rope_permute_rows``,
    which works on any array with rows first (a vector of magnitudes too)."""
    from edge_tune.converters.names import rope_permute_rows

    return rope_permute_rows(w, n_head)


def plan(config: dict, tensors: dict[str, np.ndarray], base: BaseInfo,
         where: str = "adapter") -> dict[str, Delta]:
    """GGUF tensor name -> Delta for every adapted module. Pure; refuses what cannot merge."""
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise EdgeTuneError(f"{where}: peft_type {config.get('peft_type')!r} is not LoRA")
    if config.get("lora_bias"):
        raise EdgeTuneError(f"{where}: lora_bias=true is not supported by merge")
    if config.get("modules_to_save") or any("modules_to_save" in k for k in tensors):
        raise EdgeTuneError(f"{where}: modules_to_save ({config.get('modules_to_save')}) is "
                            "not supported by merge yet; retrain without it")
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        split = split_peft_key(key)
        if split is None:
            raise EdgeTuneError(f"{where}: tensor {key!r} is not a LoRA A/B/magnitude weight")
        modules.setdefault(split[0], {})[split[1]] = np.asarray(arr, dtype=np.float32)
    if not modules:
        raise EdgeTuneError(f"{where}: no LoRA tensors found")
    out: dict[str, Delta] = {}
    for module, parts in sorted(modules.items()):
        name = gguf_tensor_name(module, base.arch, base.n_blocks)
        if name is None:
            raise EdgeTuneError(f"{where}: module {module!r} has no GGUF tensor for arch "
                                f"{base.arch!r} (an adapter for another architecture?)")
        if name == "output.weight" and base.tied_embeddings:
            raise EdgeTuneError(f"{where}: LoRA on lm_head cannot be merged into this base: its "
                                "embeddings are tied (no output.weight)")
        embedding = "lora_embedding_A" in parts
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else \
            ("lora_A", "lora_B")
        if a_key not in parts or b_key not in parts:
            raise EdgeTuneError(f"{where}: module {module!r} lacks {a_key} or {b_key}")
        a, b = parts[a_key], parts[b_key]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise EdgeTuneError(f"{where}: module {module!r}: A {list(a.shape)} and B "
                                f"{list(b.shape)} do not multiply")
        magnitude = parts.get("lora_magnitude_vector")
        if magnitude is not None and embedding:
            raise EdgeTuneError(f"{where}: DoRA on an embedding ({module}) is not supported")
        which = needs_rope_permute(base.arch, name)
        heads = (base.n_head if which == "q" else base.n_head_kv) if which else 0
        out[name] = Delta(a=a, b=b, scale=_module_scale(config, module, a.shape[0]),
                          embedding=embedding,
                          magnitude=None if magnitude is None else magnitude.reshape(-1),
                          permute_heads=heads)
    return out


def apply(w: np.ndarray, d: Delta, name: str = "") -> np.ndarray:
    """The merged weight for base weight ``w`` (numpy orientation, GGUF row order)."""
    delta = d.dense()
    if delta.shape != w.shape:
        raise EdgeTuneError(f"adapter does not fit the base model: tensor {name!r} has shape "
                            f"{list(w.shape)}, the adapter's delta {list(delta.shape)}")
    if d.permute_heads:
        delta = permute_rows(delta, d.permute_heads)
    merged = w.astype(np.float64) + delta
    if d.magnitude is not None:
        m = d.magnitude.astype(np.float64)
        if m.shape[0] != w.shape[0]:
            raise EdgeTuneError(f"adapter does not fit the base model: DoRA magnitude of "
                                f"{name!r} has {m.shape[0]} rows, the weight {w.shape[0]}")
        if d.permute_heads:
            m = permute_rows(m, d.permute_heads)
        merged *= (m / np.linalg.norm(merged, axis=1))[:, None]
    return merged.astype(np.float32)


def check_base_complete(info: BaseInfo, path: Path) -> None:
    """Every block must carry the same kinds of tensors as block 0, plus the embeddings: a
    base with missing tensors is refused here rather than by a crash in llama.cpp later."""
    names = set(info.tensors or {})
    if "token_embd.weight" not in names:
        raise EdgeTuneError(f"{path}: base model lacks tensor 'token_embd.weight'")
    kinds = {n.split(".", 2)[2] for n in names if n.startswith("blk.0.")}
    for i in range(info.n_blocks):
        for kind in sorted(kinds):
            if f"blk.{i}.{kind}" not in names:
                raise EdgeTuneError(f"{path}: base model lacks tensor 'blk.{i}.{kind}' "
                                    f"({info.n_blocks} blocks declared)")


def _numpy_shape(t) -> tuple[int, ...]:
    return tuple(reversed([int(x) for x in t.shape]))


def out_dtype(outtype: str, shape: tuple[int, ...]):
    # llama.cpp keeps 1-D tensors (norms) in F32 for every file type.
    return np.float16 if outtype == "F16" and len(shape) > 1 else np.float32


def estimate_bytes(reader, outtype: str) -> int:
    return sum(int(np.prod(_numpy_shape(t))) * np.dtype(out_dtype(outtype, _numpy_shape(t))).itemsize
               for t in reader.tensors)


def check_disk(directory: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < need + (16 << 20):
        raise EdgeTuneError(f"{directory}: not enough disk space for {what}: needs about "
                            f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free")


def _copy_metadata(reader, writer, outtype: str) -> None:
    import gguf

    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment"):
            continue  # written by the writer itself
        if key == "general.file_type":
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, f.contents(), vtype, sub_type=f.types[-1])
        else:
            writer.add_key_value(key, f.contents(), vtype)
    writer.add_uint32("general.file_type", FILE_TYPE[outtype])


def merge(base_gguf: Path, config: dict, tensors: dict[str, np.ndarray], out_path: Path,
          outtype: str = "F32", where: str = "adapter", on_event: EventSink = ignore,
          extra_metadata: dict | None = None) -> dict:
    """Write ``out_path`` (atomically) = base + adapter, as F32 or F16. Returns a summary."""
    import gguf

    from edge_tune.fsutil import atomic_path

    if outtype not in FILE_TYPE:
        raise ValueError(outtype)
    base_gguf, out_path = Path(base_gguf), Path(out_path)
    reader = open_gguf(base_gguf)
    info = from_gguf(base_gguf, reader)
    check_base_complete(info, base_gguf)
    deltas = plan(config, tensors, info, where)
    by_name = {t.name: t for t in reader.tensors}
    for name, d in deltas.items():
        if name not in by_name:
            raise EdgeTuneError(f"{where}: adapter targets {name!r}, which the base model "
                                f"{base_gguf.name} does not have")
        want = _numpy_shape(by_name[name])
        got = (d.a.shape[1], d.b.shape[0]) if d.embedding else (d.b.shape[0], d.a.shape[1])
        if got != want:
            raise EdgeTuneError(f"{where}: adapter does not fit the base model: {name!r} is "
                                f"{list(want)} in the base, the adapter's delta {list(got)}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    check_disk(out_path.parent, estimate_bytes(reader, outtype), str(out_path))
    arch = field_value(reader, "general.architecture")
    total = len(reader.tensors)
    try:
        with atomic_path(out_path) as tmp:
            w = gguf.GGUFWriter(str(tmp), arch)
            _copy_metadata(reader, w, outtype)
            for key, value in (extra_metadata or {}).items():
                w.add_string(key, str(value))
            for t in reader.tensors:
                shape = _numpy_shape(t)
                dt = np.dtype(out_dtype(outtype, shape))
                w.add_tensor_info(t.name, shape, dt, int(np.prod(shape)) * dt.itemsize)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for i, t in enumerate(reader.tensors):
                shape = _numpy_shape(t)
                arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
                if t.name in deltas:
                    arr = apply(arr, deltas[t.name], t.name)
                w.write_tensor_data(np.ascontiguousarray(arr, dtype=out_dtype(outtype, shape)))
                on_event(Progress("merge", i + 1, total, "tensors", f"merging ({outtype})"))
            w.close()
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise EdgeTuneError(f"{out_path.parent}: disk full while writing {out_path.name}; "
                                "nothing was written") from None
        raise
    return {"path": str(out_path), "merged": len(deltas), "tensors": total, "outtype": outtype,
            "dora": any(d.magnitude is not None for d in deltas.values()),
            "f32_bytes": estimate_bytes(reader, "F32")}
