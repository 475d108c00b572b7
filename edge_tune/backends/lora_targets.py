"""Which layers get LoRA: ``--target-modules`` checked against the model, before it loads.

The names are the last part of a module's path inside a block (``q_proj`` for
``model.layers.3.self_attn.q_proj``), as PEFT's ``target_modules`` and mlx-lm's ``keys`` match
them. ``all-linear`` means every linear layer of the blocks (PEFT's meaning: the output layer is
left out). The model's linear layers are read from the weight files' headers
(``*.safetensors``: the 2-D ``.weight`` tensors under ``layers.N.``), so a wrong name is one
line before any weight is loaded, on every backend, with or without torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from edge_tune.config import ALL_LINEAR, DEFAULT_TARGETS
from edge_tune.errors import UsageError

_BLOCK = re.compile(r"(?:^|\.)layers\.\d+\.(.+)\.weight$")


def linear_names(shapes: dict[str, list[int]]) -> list[str]:
    """The last name part of every 2-D weight inside a block, sorted. ``shapes``: tensor name
    -> shape, as a safetensors header lists them. Pure."""
    names = set()
    for tensor, shape in shapes.items():
        m = _BLOCK.search(tensor)
        if not m or len(shape) != 2:
            continue
        parts = m.group(1).split(".")
        if any(p.startswith("lora_") for p in parts):  # a PEFT-wrapped save: its own layers
            continue
        names.add([p for p in parts if p != "base_layer"][-1])
    return sorted(names)


def resolve(requested: list[str], available: list[str], where: str = "--target-modules") -> list[str]:
    """The module names LoRA goes on. ``all-linear`` gives ``available``; the default list
    keeps the names this model has (families name their projections differently); names the
    user gave must all exist. Raises UsageError listing the model's linear modules. Pure."""
    if requested == [ALL_LINEAR]:
        return list(available)
    if requested == DEFAULT_TARGETS:
        kept = [n for n in requested if n in available]
    else:
        unknown = [n for n in requested if n not in available]
        if unknown:
            raise UsageError(f"{where}: {', '.join(unknown)}: no such linear module in this "
                             f"model's blocks (expected some of {', '.join(available)}, or "
                             f"{ALL_LINEAR})")
        kept = list(requested)
    if not kept:
        raise UsageError(f"{where}: none of {', '.join(requested)} is a linear module of this "
                         f"model (it has {', '.join(available)}; or use {ALL_LINEAR})")
    return kept


def weight_shapes(hf_dir: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from the headers of ``hf_dir``'s safetensors files (the format's
    first 8 bytes are the header length, little-endian, then the JSON header); no weights
    are read. Empty when the model has no safetensors files."""
    shapes: dict[str, list[int]] = {}
    for path in sorted(Path(hf_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def for_model(hf_dir: Path, requested: list[str]) -> list[str]:
    """:func:`resolve` against the model in ``hf_dir``; ``requested`` unchanged (left to the
    backend) when its weights are not in safetensors files."""
    available = linear_names(weight_shapes(hf_dir))
    return resolve(requested, available) if available else list(requested)
