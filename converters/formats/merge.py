"""Merge a PEFT LoRA adapter into a GGUF base: one GGUF with the base's metadata, tokenizer and
chat template, and weights ``W + scale·B·A`` (DoRA: ``m/‖W + scale·B·A‖ · (W + scale·B·A)``).

The merged file computes what PEFT computes with the adapter *unmerged*:

* ``modules_to_save`` copies replace their base tensors; a LoRA ``bias`` (``lora_bias``) adds
  ``scale · bias`` to the layer's bias (created where llama.cpp reads an optional one);
* on a tied base (no ``output.weight``), a change to the embedding or to the output layer
  unties them: ``output.weight`` is written as the base's ``token_embd`` and each change goes
  to its own side only. (``merge_and_unload()`` on a tied HF model changes both sides: that is
  not what the adapter computed while it was trained.)

Streamed tensor by tensor: the base is memory-mapped, each tensor is dequantized with gguf-py's
own code, the delta added, and the result written before the next is read, so peak memory is
about one tensor plus the adapter, not the model.

Layouts: the base GGUF of a llama-family model holds q/k rows in llama.cpp's rope order, while
PEFT's deltas are in HF order. The delta's rows are permuted exactly as
:func:`edge_tune.converters.formats.names.rope_permute_rows` permutes LoRA B for a GGUF adapter (it is
the same linear map on rows, so permuting B or B·A is the same thing). Everything else about
scales (rsLoRA, rank/alpha patterns) is PEFT's own rule, shared with ``peft_to_gguf``.
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from edge_tune.converters.formats.base_info import (BaseInfo, copy_fields, field_value, from_gguf,
                                           open_gguf)
from edge_tune.converters.formats.names import gguf_tensor_name, needs_rope_permute
from edge_tune.converters.formats.lora_graph import merge_can_untie, untie_route
from edge_tune.converters.formats.peft_to_gguf import PEFT_MERGE_ROUTE, _module_scale, lora_pair

from edge_tune.errors import DataError, DiskFull, Unsupported
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
    from edge_tune.converters.formats.names import rope_permute_rows

    return rope_permute_rows(w, n_head)


@dataclass
class MergePlan:
    """Everything a merge changes, by GGUF tensor name (numpy orientation, HF row order)."""

    deltas: dict[str, Delta]
    replace: dict[str, np.ndarray] = field(default_factory=dict)  # modules_to_save copies
    bias_add: dict[str, np.ndarray] = field(default_factory=dict)  # scale · lora_B.bias
    untie: bool = False  # write output.weight = the base's token_embd (then apply its changes)
    new_biases: dict[str, int] = field(default_factory=dict)  # bias tensors to create: rows

    def targets(self) -> set[str]:
        return set(self.deltas) | set(self.replace) | set(self.bias_add)


# Archs whose llama.cpp loader reads attention/FFN biases when a file has them
# (src/models/llama.cpp: TENSOR_NOT_REQUIRED), so a merge may add them.
OPTIONAL_BIAS_ARCHS = frozenset({"llama", "granite"})
# Archs whose HF -> GGUF conversion stores RMSNorm weights as 1 + w (Gemma's norm is x·(1+w)).
NORM_PLUS_ONE_ARCHS = frozenset({"gemma", "gemma2", "gemma3"})


def _gguf_name(module: str, info: BaseInfo, where: str) -> str:
    name = gguf_tensor_name(module, info.arch, info.n_blocks)
    if name is None:
        raise DataError(f"{where}: module {module!r} has no GGUF tensor for arch "
                        f"{info.arch!r} (an adapter for another architecture?)")
    return name


def _heads(info: BaseInfo, name: str) -> int:
    which = needs_rope_permute(info.arch, name)
    return (info.n_head if which == "q" else info.n_head_kv) if which else 0


def plan(config: dict, tensors: dict[str, np.ndarray], base: BaseInfo,
         where: str = "adapter") -> MergePlan:
    """What merging this PEFT adapter into ``base`` writes. Pure; refuses what cannot merge.

    Matches PEFT with the adapter *unmerged*: on a tied base a change to the embedding or the
    output layer unties them (PEFT's embedding LoRA and its modules_to_save copy of
    embed_tokens act on the input only; a LoRA/copy of lm_head on the output only).
    """
    from edge_tune.converters.formats.peft_to_gguf import (check_base_layers,
                                                            check_vocabulary, parse_adapter)

    check_vocabulary(config, tensors, base, where)  # a resized vocabulary cannot merge here
    adapter = parse_adapter(config, tensors, where)
    check_base_layers(adapter, base, where)
    out = MergePlan(deltas={})
    for module, parts in sorted(adapter.loras.items()):
        name = _gguf_name(module, base, where)
        embedding, a, b = lora_pair(parts, module, where)
        magnitude = parts.get("lora_magnitude_vector")
        if magnitude is not None and embedding:
            raise Unsupported(f"{where}: DoRA on an embedding ({module}) is not supported; "
                              f"{PEFT_MERGE_ROUTE}")
        scale = _module_scale(config, module, a.shape[0])
        out.deltas[name] = Delta(a=a, b=b, scale=scale, embedding=embedding,
                                 magnitude=None if magnitude is None else magnitude.reshape(-1),
                                 permute_heads=_heads(base, name))
        if module in adapter.lora_bias:
            bias = adapter.lora_bias[module].reshape(-1).astype(np.float64) * scale
            out.bias_add[name[: -len(".weight")] + ".bias"] = bias
    for module, leaves in sorted(adapter.saved.items()):
        name = _gguf_name(module, base, where)
        for leaf, arr in leaves.items():
            target = name if leaf == "weight" else name[: -len(".weight")] + ".bias"
            if arr.ndim == 1 and base.arch in NORM_PLUS_ONE_ARCHS and "norm" in target:
                arr = arr + 1.0
            heads = _heads(base, name)
            out.replace[target] = permute_rows(arr, heads) if heads else arr
    _tie(out, config, base, where)
    _check_targets(out, base, where)
    return out


def _tie(out: MergePlan, config: dict, base: BaseInfo, where: str) -> None:
    """On a tied base: PEFT's ``ensure_weight_tying`` changes the one tied tensor once;
    otherwise a change to the embedding or output layer unties them (``out.untie``), where
    llama.cpp's graph can read a separate output layer."""
    if config.get("ensure_weight_tying") and base.tied_embeddings:
        # PEFT kept lm_head tied to embed_tokens, adapter included: the tied tensor changes once.
        for table in (out.deltas, out.replace, out.bias_add):
            if "output.weight" in table and "token_embd.weight" not in table:
                raise Unsupported(f"{where}: ensure_weight_tying with an lm_head-only change "
                                  f"is not supported by merge; {PEFT_MERGE_ROUTE}")
            table.pop("output.weight", None)
    elif {"token_embd.weight", "output.weight"} & out.targets() and base.tied_embeddings:
        if not merge_can_untie(base.arch):
            raise Unsupported(f"{where}: the adapter changes the embedding or output layer of "
                              f"a tied base; {untie_route(base.arch)}")
        out.untie = True


def _check_targets(out: MergePlan, base: BaseInfo, where: str) -> None:
    """Every tensor the merge writes exists in the base (or is a bias llama.cpp's graph reads
    when present: recorded in ``out.new_biases``); else EdgeTuneError naming PEFT's route."""
    have = dict(base.tensors or {})
    if out.untie:
        have["output.weight"] = have.get("token_embd.weight", ())
    for name in sorted(out.targets()):
        if name in have:
            continue
        if name.endswith(".bias") and base.arch in OPTIONAL_BIAS_ARCHS and \
                name[: -len(".bias")] + ".weight" in have:
            out.new_biases[name] = int(have[name[: -len(".bias")] + ".weight"][1])
            continue
        what = "a bias" if name.endswith(".bias") else "this tensor"
        raise Unsupported(f"{where}: adapter targets {name!r}, which the base model does not "
                          f"have, and llama.cpp's {base.arch} graph does not read {what} "
                          f"from a merged file either; {PEFT_MERGE_ROUTE}")


def apply(w: np.ndarray, d: Delta, name: str = "") -> np.ndarray:
    """The merged weight for base weight ``w`` (numpy orientation, GGUF row order)."""
    delta = d.dense()
    if delta.shape != w.shape:
        raise DataError(f"adapter does not fit the base model: tensor {name!r} has shape "
                        f"{list(w.shape)}, the adapter's delta {list(delta.shape)}")
    if d.permute_heads:
        delta = permute_rows(delta, d.permute_heads)
    merged = w.astype(np.float64) + delta
    if d.magnitude is not None:
        m = d.magnitude.astype(np.float64)
        if m.shape[0] != w.shape[0]:
            raise DataError(f"adapter does not fit the base model: DoRA magnitude of "
                            f"{name!r} has {m.shape[0]} rows, the weight {w.shape[0]}")
        if d.permute_heads:
            m = permute_rows(m, d.permute_heads)
        merged *= (m / np.linalg.norm(merged, axis=1))[:, None]
    return merged.astype(np.float32)


def merged_tensor(name: str, w: np.ndarray, p: MergePlan) -> np.ndarray:
    """Base tensor ``w`` (numpy orientation) after the plan: copy, delta, bias."""
    if name in p.replace:
        new = p.replace[name]
        if new.shape != w.shape:
            raise DataError(f"adapter does not fit the base model: the modules_to_save copy "
                            f"for {name!r} is {list(new.shape)}, the base tensor "
                            f"{list(w.shape)}")
        w = new.astype(np.float32)
    if name in p.deltas:
        w = apply(w, p.deltas[name], name)
    if name in p.bias_add:
        add = p.bias_add[name]
        if add.shape != w.shape:
            raise DataError(f"adapter does not fit the base model: LoRA bias for {name!r} "
                            f"has {add.shape[0]} rows, the base {w.shape[0]}")
        heads = _bias_heads(name, p)
        w = (w.astype(np.float64) + (permute_rows(add, heads) if heads else add)).astype(
            np.float32)
    return w


def _bias_heads(bias_name: str, p: MergePlan) -> int:
    d = p.deltas.get(bias_name[: -len(".bias")] + ".weight")
    return d.permute_heads if d is not None else 0


def check_base_complete(info: BaseInfo, path: Path) -> None:
    """Every block must carry the same kinds of tensors as block 0, plus the embeddings: a
    base with missing tensors is refused here rather than by a crash in llama.cpp later."""
    names = set(info.tensors or {})
    if "token_embd.weight" not in names:
        raise DataError(f"{path}: base model lacks tensor 'token_embd.weight'")
    kinds = {n.split(".", 2)[2] for n in names if n.startswith("blk.0.")}
    for i in range(info.n_blocks):
        for kind in sorted(kinds):
            if f"blk.{i}.{kind}" not in names:
                raise DataError(f"{path}: base model lacks tensor 'blk.{i}.{kind}' "
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
        raise DiskFull(f"{directory}: not enough disk space for {what}: needs about "
                       f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free")


def _copy_metadata(reader, writer, outtype: str) -> None:
    copy_fields(reader, writer, skip={"general.alignment", "general.file_type"})
    writer.add_uint32("general.file_type", FILE_TYPE[outtype])


def _check_shapes(p: MergePlan, shapes: dict, where: str, base_name: str) -> None:
    """Each delta and modules_to_save copy of ``p`` has the shape of the base tensor it
    changes (``shapes``: numpy shapes by GGUF name); else EdgeTuneError saying which."""
    for name, d in p.deltas.items():
        if name not in shapes:
            raise DataError(f"{where}: adapter targets {name!r}, which the base model "
                            f"{base_name} does not have")
        want = shapes[name]
        got = (d.a.shape[1], d.b.shape[0]) if d.embedding else (d.b.shape[0], d.a.shape[1])
        if got != want:
            raise DataError(f"{where}: adapter does not fit the base model: {name!r} is "
                            f"{list(want)} in the base, the adapter's delta {list(got)}")
    for name, arr in p.replace.items():
        if shapes.get(name) != arr.shape:
            raise DataError(f"{where}: adapter does not fit the base model: the "
                            f"modules_to_save copy for {name!r} is {list(arr.shape)}, the "
                            f"base's {list(shapes.get(name, ()))}; {PEFT_MERGE_ROUTE}")


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
    p = plan(config, tensors, info, where)
    by_name = {t.name: t for t in reader.tensors}
    shapes = {name: _numpy_shape(t) for name, t in by_name.items()}
    if p.untie:
        shapes["output.weight"] = shapes["token_embd.weight"]
    _check_shapes(p, shapes, where, base_gguf.name)
    # What is written, in order: (name, numpy shape, base tensor it starts from or None).
    layout: list[tuple[str, tuple[int, ...], object]] = []
    for t in reader.tensors:
        layout.append((t.name, shapes[t.name], t))
        if p.untie and t.name == "token_embd.weight":
            layout.append(("output.weight", shapes[t.name], t))
    layout += [(name, (rows,), None) for name, rows in sorted(p.new_biases.items())]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    check_disk(out_path.parent, estimate_bytes(reader, outtype) +
               (int(np.prod(shapes["token_embd.weight"])) * 4 if p.untie else 0), str(out_path))
    arch = field_value(reader, "general.architecture")
    total = len(layout)
    try:
        with atomic_path(out_path) as tmp:
            w = gguf.GGUFWriter(str(tmp), arch)
            _copy_metadata(reader, w, outtype)
            for key, value in (extra_metadata or {}).items():
                w.add_string(key, str(value))
            for name, shape, _ in layout:
                dt = np.dtype(out_dtype(outtype, shape))
                w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * dt.itemsize)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for i, (name, shape, src) in enumerate(layout):
                if src is None:
                    arr = np.zeros(shape, np.float32)
                else:
                    arr = gguf.quants.dequantize(src.data, src.tensor_type).reshape(shape)
                arr = merged_tensor(name, arr, p)
                w.write_tensor_data(np.ascontiguousarray(arr, dtype=out_dtype(outtype, shape)))
                on_event(Progress("merge", i + 1, total, "tensors", f"merging ({outtype})"))
            w.close()
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFull(f"{out_path.parent}: disk full while writing {out_path.name}; "
                           "nothing was written") from None
        raise
    return {"path": str(out_path), "merged": len(p.targets()), "tensors": total,
            "outtype": outtype, "untied": p.untie, "replaced": sorted(p.replace),
            "dora": any(d.magnitude is not None for d in p.deltas.values()),
            "f32_bytes": estimate_bytes(reader, "F32")}
