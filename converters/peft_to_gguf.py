"""PEFT LoRA adapter -> GGUF LoRA adapter that llama.cpp loads.

``plan()`` is pure numpy: PEFT config + tensors + base facts in, GGUF alpha + named arrays out.
``convert()`` does the I/O and writes atomically. What llama.cpp computes at run time is
``W x + (alpha_gguf / r) * B A x`` with r read per tensor, so every PEFT scaling variant is
mapped onto that one formula:

* plain LoRA: scale = lora_alpha / r        -> alpha_gguf = lora_alpha
* rsLoRA:     scale = lora_alpha / sqrt(r)  -> alpha_gguf = lora_alpha * sqrt(r)
* rank_pattern / alpha_pattern: per-module scales differ; the ratio to the file-wide scale is
  folded into that module's B.
DoRA, ``modules_to_save`` and LoRA on a tied lm_head have no GGUF LoRA form and are refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from edge_tune.converters.base_info import BaseInfo, writing_gguf
from edge_tune.converters.names import (
    gguf_tensor_name, needs_rope_permute, rope_permute_rows, split_peft_key,
)
from edge_tune.converters.validate import check_tensors
from edge_tune.errors import EdgeTuneError

OUTTYPES = ("f32", "f16", "q8_0")


@dataclass
class Plan:
    alpha: float
    tensors: list[tuple[str, np.ndarray]]  # GGUF name, numpy array (PEFT orientation)
    rank: int


def _pattern_value(patterns: dict, module: str, default):
    # PEFT matches pattern keys as regexes against the end of the module name.
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _module_scale(config: dict, module: str, rank: int) -> float:
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def refuse_unsupported(config: dict, keys: list[str], where: str) -> None:
    if config.get("peft_type", "LORA").upper() != "LORA":
        raise EdgeTuneError(f"{where}: peft_type {config.get('peft_type')!r} is not LoRA; "
                            "only LoRA adapters convert to GGUF")
    if config.get("use_dora") or any("lora_magnitude_vector" in k for k in keys):
        raise EdgeTuneError(f"{where}: DoRA adapters have no GGUF LoRA form (llama.cpp has no "
                            "magnitude vectors); merge the adapter into the base model instead")
    if config.get("modules_to_save") or any("modules_to_save" in k for k in keys):
        raise EdgeTuneError(f"{where}: modules_to_save (full copies of "
                            f"{config.get('modules_to_save')}) has no GGUF LoRA form; "
                            "merge the adapter into the base model instead")
    if config.get("lora_bias"):
        raise EdgeTuneError(f"{where}: lora_bias=true has no GGUF LoRA form")


def plan(config: dict, tensors: dict[str, np.ndarray], base: BaseInfo,
         where: str = "adapter") -> Plan:
    refuse_unsupported(config, list(tensors), where)
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        split = split_peft_key(key)
        if split is None:
            raise EdgeTuneError(f"{where}: tensor {key!r} is not a LoRA A/B weight")
        module, part = split
        modules.setdefault(module, {})[part] = np.asarray(arr, dtype=np.float32)
    if not modules:
        raise EdgeTuneError(f"{where}: no LoRA tensors found")

    ranks = {m: (p.get("lora_A", p.get("lora_embedding_A"))).shape[0] for m, p in modules.items()
             if ("lora_A" in p or "lora_embedding_A" in p)}
    ref_rank = int(config.get("r") or next(iter(ranks.values())))
    # alpha_gguf / ref_rank must equal PEFT's scale for a default (un-patterned) module.
    alpha = _module_scale({**config, "alpha_pattern": None}, "", ref_rank) * ref_rank

    out: list[tuple[str, np.ndarray]] = []
    for module, parts in sorted(modules.items()):
        name = gguf_tensor_name(module, base.arch, base.n_blocks)
        if name is None:
            raise EdgeTuneError(f"{where}: module {module!r} has no GGUF tensor for arch "
                                f"{base.arch!r}")
        if name == "output.weight" and base.tied_embeddings:
            raise EdgeTuneError(f"{where}: LoRA on lm_head cannot run on this base: its "
                                "embeddings are tied (no output.weight); retrain without lm_head")
        if "lora_embedding_A" in parts:
            a_key, b_key = "lora_embedding_A", "lora_embedding_B"
        else:
            a_key, b_key = "lora_A", "lora_B"
        if a_key not in parts or b_key not in parts:
            raise EdgeTuneError(f"{where}: module {module!r} lacks {a_key} or {b_key}")
        a, b = parts[a_key], parts[b_key]
        rank = a.shape[0]
        # Fold any per-module deviation from the file-wide scale into B.
        factor = _module_scale(config, module, rank) * rank / alpha
        if not math.isclose(factor, 1.0, rel_tol=1e-9):
            b = b * np.float32(factor)
        if a_key == "lora_embedding_A":
            # llama.cpp flips A and B for token_embd: lora_a = A^T, lora_b = B.
            a = a.T
        # Shapes first: the q/k permutation below assumes the base's head layout.
        problems = check_tensors({name + ".lora_a": tuple(reversed(a.shape)),
                                  name + ".lora_b": tuple(reversed(b.shape))}, base)
        if problems:
            raise EdgeTuneError(f"{where}: adapter does not fit the base model: {problems[0]}")
        which = needs_rope_permute(base.arch, name)
        if which:
            b = rope_permute_rows(b, base.n_head if which == "q" else base.n_head_kv)
        out.append((name + ".lora_a", np.ascontiguousarray(a)))
        out.append((name + ".lora_b", np.ascontiguousarray(b)))

    problems = check_tensors({n: tuple(reversed(a.shape)) for n, a in out}, base)
    if problems:
        raise EdgeTuneError(f"{where}: adapter does not fit the base model: {problems[0]}")
    return Plan(alpha=float(alpha), tensors=out, rank=ref_rank)


def read_peft_dir(adapter_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Load ``adapter_config.json`` + ``adapter_model.safetensors`` (never pickles)."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    st_path = adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise EdgeTuneError(f"{adapter_dir}: no adapter_config.json (expected a PEFT adapter "
                            "directory or an edge-tune run directory)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise EdgeTuneError(f"{cfg_path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not st_path.is_file():
        extra = " (adapter_model.bin is a pickle: edge-tune loads safetensors only)" \
            if (adapter_dir / "adapter_model.bin").exists() else ""
        raise EdgeTuneError(f"{adapter_dir}: no adapter_model.safetensors{extra}")
    return config, _load_safetensors(st_path)


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}
    except TypeError:
        pass  # bf16 has no numpy dtype: go through torch
    except Exception as exc:
        raise EdgeTuneError(f"{path}: unreadable safetensors file ({exc})") from None
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(path)).items()}


def write_gguf(plan_: Plan, arch: str, out_path: Path, outtype: str = "f32",
               metadata: Optional[dict] = None) -> Path:
    """Write the planned adapter to ``out_path`` atomically (temp file, then rename)."""
    import gguf

    if outtype not in OUTTYPES:
        raise EdgeTuneError(f"--outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    out_path = Path(out_path)
    with writing_gguf(out_path, arch) as w:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(plan_.alpha))
        for key, value in (metadata or {}).items():
            if isinstance(value, str):
                w.add_string(key, value)
            elif isinstance(value, int):
                w.add_uint32(key, value)
            elif isinstance(value, float):
                w.add_float32(key, value)
        for name, arr in plan_.tensors:
            if outtype == "f16":
                w.add_tensor(name, arr.astype(np.float16))
            elif outtype == "q8_0" and arr.shape[-1] % 32 == 0:
                q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            elif outtype == "q8_0":  # rows too short to quantize in 32-blocks: keep f16
                w.add_tensor(name, arr.astype(np.float16))
            else:
                w.add_tensor(name, arr.astype(np.float32))
    return out_path


def convert(adapter_dir: Path, base: BaseInfo, out_path: Path, outtype: str = "f32",
            metadata: Optional[dict] = None) -> Plan:
    config, tensors = read_peft_dir(adapter_dir)
    p = plan(config, tensors, base, where=str(adapter_dir))
    write_gguf(p, base.arch, out_path, outtype, metadata)
    return p
