"""Training backends by name, with availability and the reason for every "no".

A backend is a ``"module:function"`` string, imported only when training starts (inside the
training subprocess), so listing backends never imports torch, mlx or unsloth.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

from edge_tune.errors import EdgeTuneError
from edge_tune.hardware import Hardware, missing_modules, torch_cuda_version


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str
    entry: Optional[str]  # "module:function" training entry point; None = not built yet
    check: Callable[[Hardware], Optional[str]]  # returns the reason it is unavailable, or None
    # Why `auto` passes over a backend that works here but is the wrong choice (or None).
    auto_skip: Callable[[Hardware], Optional[str]] = lambda hw: None
    # Modules the training subprocess imports before anything else (libraries that patch
    # others on import must come first).
    preload: tuple[str, ...] = ()


@dataclass(frozen=True)
class Availability:
    name: str
    summary: str
    available: bool
    reason: str
    auto: bool = True  # whether `auto` may pick it


def _check_cpu(hw: Hardware) -> Optional[str]:
    missing = missing_modules("torch", "transformers", "peft")
    if missing:
        return f"missing {', '.join(missing)}: pip install 'edge-tune[cpu]'"
    return None


def _check_mlx(hw: Hardware) -> Optional[str]:
    missing = missing_modules("mlx", "mlx_lm")
    if missing:
        extra = "mlx" if hw.apple is not None else "mlx-cpu"
        where = "" if hw.apple is not None else " (not Apple Silicon: mlx would run on the CPU)"
        return f"missing {', '.join(missing)}: pip install 'edge-tune[{extra}]'{where}"
    return None


def _skip_mlx(hw: Hardware) -> Optional[str]:
    # mlx[cpu] works on Linux but is ~20x slower than torch there: only on request.
    if hw.apple is None:
        return ("mlx runs here on the CPU only, ~20x slower than torch; auto leaves it to "
                "--backend mlx")
    return None


UNSLOTH_MIN_COMPUTE = (7, 0)  # Unsloth's Triton kernels need Volta or newer


def _check_unsloth(hw: Hardware) -> Optional[str]:
    if not hw.cuda_gpus:
        return "needs an NVIDIA GPU (nvidia-smi found none)"
    if not any(g.compute_major_minor >= UNSLOTH_MIN_COMPUTE for g in hw.cuda_gpus):
        g = hw.cuda_gpus[0]
        return (f"unsupported GPU: {g.name} has compute capability {g.compute_capability}; "
                "Unsloth needs 7.0 or newer (V100, T4, RTX 20xx and later)")
    if missing_modules("torch"):
        return "missing torch: install a CUDA build of torch, then pip install 'edge-tune[cuda]'"
    if torch_cuda_version() is None:
        return ("the installed torch is a CPU-only build: install a CUDA build of torch "
                "(README: CUDA / Unsloth)")
    if missing_modules("unsloth"):
        return "missing unsloth: pip install 'edge-tune[cuda]'"
    return None


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("unsloth", "Unsloth 4-bit QLoRA on an NVIDIA CUDA GPU",
                "edge_tune.backends.unsloth_qlora:train", _check_unsloth,
                preload=("unsloth",)),
        Backend("mlx", "mlx-lm LoRA on Apple Silicon", "edge_tune.backends.mlx_lora:train",
                _check_mlx, _skip_mlx),
        Backend("cpu", "torch + PEFT LoRA on the CPU", "edge_tune.backends.cpu:train", _check_cpu),
    )
}
# The order `auto` tries them in: fastest hardware first.
AUTO_ORDER = ("unsloth", "mlx", "cpu")


def availability(hw: Hardware) -> list[Availability]:
    out = []
    for name in AUTO_ORDER:
        b = BACKENDS[name]
        reason = b.check(hw)
        ok = reason is None and b.entry is not None
        skip = b.auto_skip(hw) if ok else None
        out.append(Availability(name, b.summary, ok, skip or reason or "available",
                                auto=skip is None))
    return out


def choose(requested: str, hw: Hardware) -> tuple[str, str]:
    """Resolve ``auto``/a name to an available backend: returns (name, why)."""
    table = {a.name: a for a in availability(hw)}
    if requested == "auto":
        for name in AUTO_ORDER:
            if table[name].available and table[name].auto:
                # The per-backend "why not" lines live in `doctor`; keep this one short.
                return name, "the fastest backend available on this machine"
        raise EdgeTuneError("no training backend is available: "
                            + "; ".join(f"{a.name}: {a.reason}" for a in table.values()))
    if requested not in table:
        raise EdgeTuneError(f"--backend {requested!r}: unknown (expected auto, "
                            + ", ".join(AUTO_ORDER) + ")")
    if not table[requested].available:
        raise EdgeTuneError(f"--backend {requested}: not available here: {table[requested].reason}")
    return requested, "requested with --backend"


def preload(name: str) -> None:
    """Import a backend's ``preload`` modules (first thing in the training subprocess)."""
    for module in BACKENDS[name].preload:
        importlib.import_module(module)


def load_entry(name: str) -> Callable:
    """Import a backend's training function (called inside the training subprocess)."""
    entry = BACKENDS[name].entry
    if entry is None:
        raise EdgeTuneError(f"backend {name!r} is not part of this release")
    module, func = entry.split(":")
    return getattr(importlib.import_module(module), func)
