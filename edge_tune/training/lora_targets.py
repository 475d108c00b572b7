"""Which layers get LoRA: ``--target-modules`` checked against the model, before it loads.

The names are the last part of a module's path inside a block (``q_proj`` for
``model.layers.3.self_attn.q_proj``), as PEFT's ``target_modules`` and mlx-lm's ``keys`` match
them. ``all-linear`` means every linear layer of the blocks (PEFT's meaning: the output layer is
left out). The default (``DEFAULT_TARGETS``, Llama's seven projections) means what it means on
Llama on every family: every attention and MLP projection of the blocks by the model's own
names (Phi-3's fused ``qkv_proj``/``gate_up_proj``, StarCoder2's ``c_fc``/``c_proj``), all
linear layers but mixture-of-experts routers (:func:`default_names`). The model's linear layers are read from the weight files' headers
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


def _linear(tensor: str, shape: list[int]) -> tuple[str, str] | None:
    """(block prefix, module name) of a 2-D weight inside a block, else None. Pure."""
    m = _BLOCK.search(tensor)
    if not m or len(shape) != 2:
        return None
    parts = m.group(1).split(".")
    if any(p.startswith("lora_") for p in parts):  # a PEFT-wrapped save: its own layers
        return None
    return tensor[:m.start(1)], [p for p in parts if p != "base_layer"][-1]


def linear_names(shapes: dict[str, list[int]]) -> list[str]:
    """The last name part of every 2-D weight inside a block, sorted. ``shapes``: tensor name
    -> shape, as a safetensors header lists them. Pure."""
    return sorted({found[1] for t, s in shapes.items() if (found := _linear(t, s))})


# Linear layers in a block that route tokens to experts rather than project them (Mixtral,
# Qwen-MoE, Phi-MoE); the seven Llama names are projections only, so the default skips these.
ROUTERS = frozenset({"gate", "router", "shared_expert_gate"})
# The order names are listed in: Llama's, with the fused Phi-3 names beside their parts.
_ORDER = ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj",
          "gate_up_proj", "down_proj"]


def default_names(available: list[str]) -> list[str]:
    """What the default targets on a model whose block linear layers are ``available``: every
    projection (all but :data:`ROUTERS`), in Llama's order, then the other names. Pure."""
    ordered = [n for n in _ORDER if n in available]
    return ordered + [n for n in available if n not in ordered and n not in ROUTERS]


def resolve(requested: list[str], available: list[str]) -> list[str]:
    """The module names LoRA goes on. ``all-linear`` gives ``available``; the default list
    gives :func:`default_names` (families name their projections differently); names the
    user gave must all exist. Raises UsageError listing the model's linear modules. Pure."""
    if requested == [ALL_LINEAR]:
        return list(available)
    if requested == DEFAULT_TARGETS:
        kept = default_names(available)
    else:
        unknown = [n for n in requested if n not in available]
        if unknown:
            raise UsageError(f"{', '.join(unknown)}: no such linear module in this model's "
                             f"blocks (expected some of {', '.join(available)}, or "
                             f"{ALL_LINEAR})", setting="target_modules")
        kept = list(requested)
    if not kept:
        raise UsageError(f"none of {', '.join(requested)} is a linear module of this model "
                         f"(it has {', '.join(available)}; or use {ALL_LINEAR})",
                         setting="target_modules")
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


def summary(shapes: dict[str, list[int]], targets: list[str]) -> str:
    """One line naming the layers LoRA goes on, with how many of each: "LoRA on qkv_proj x2,
    o_proj x2 (4 layers in 2 blocks)". ``shapes`` as for :func:`linear_names`; names with no
    weight in ``shapes`` are listed without a count. Pure."""
    counts: dict[str, int] = {}
    blocks = set()
    for tensor, shape in shapes.items():
        found = _linear(tensor, shape)
        if found and found[1] in targets:
            counts[found[1]] = counts.get(found[1], 0) + 1
            blocks.add(found[0])
    names = ", ".join(f"{n} x{counts[n]}" if n in counts else n for n in targets)
    total = sum(counts.values())
    return f"LoRA on {names} ({total} layers in {len(blocks)} blocks)" if total else \
        f"LoRA on {names}"
