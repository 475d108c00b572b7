"""Training backends by name: what each can do, its availability and the reason for every "no".

A backend is a ``"module:function"`` string (a :class:`TrainFn`), imported only when training
starts (inside the training subprocess), so listing backends never imports torch, mlx or
unsloth. What a backend can do is declared here (:class:`Capabilities`); the core asks
:func:`capabilities` instead of checking backend names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable, Optional, Protocol

from edge_tune.errors import Unsupported, UsageError
from edge_tune.hardware import Hardware, missing_modules, torch_cuda_version

if TYPE_CHECKING:
    from edge_tune.training.job import TrainJob, WorkerResult


class TrainFn(Protocol):
    """A backend's training entry point, called in the training subprocess with the job
    the worker prepared (examples tokenized, ``adapter_dir`` set). It saves a PEFT adapter in
    ``job.adapter_dir``, reports through ``emit`` (``edge_tune.events``), raises
    ``errors.Cancelled`` on cancel, and returns its :class:`~edge_tune.training.job.
    WorkerResult` (the worker fills in its own fields)."""

    def __call__(self, job: TrainJob, emit: Callable[[object], None]) -> WorkerResult: ...


@dataclass(frozen=True)
class Capabilities:
    resumable: bool  # writes checkpoints that `train --resume` continues
    multi_process: bool  # runs under torchrun (--nproc / --nnodes)
    # Where it computes: "cuda" (one GPU per rank, NCCL), "apple" (Metal; mlx[cpu] runs it on
    # the CPU elsewhere) or "cpu" (gloo between ranks).
    device: str
    packs_batches: bool  # honours --pack: several examples share a row (block-diagonal mask)
    full: bool = False  # trains every weight with --full (not only a LoRA adapter)
    replay_kl: bool = False  # adds --replay-kl's KL-to-base term on replay records
    # the --optimizer names it builds (loop.torch_optimizer, mlx.mlx_optimizer)
    optimizers: tuple[str, ...] = ("adamw", "sgd", "adafactor")


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str
    entry: Optional[str]  # "module:function" training entry point (a TrainFn); None = not built
    check: Callable[[Hardware], Optional[str]]  # returns the reason it is unavailable, or None
    can: Capabilities  # what it can do: the core asks this, never the name
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
                "edge_tune.training.backends.unsloth:train", _check_unsloth,
                Capabilities(resumable=True, multi_process=True, device="cuda",
                             packs_batches=False,
                             optimizers=("adamw", "adamw_8bit", "sgd", "adafactor")),
                preload=("unsloth",)),
        Backend("mlx", "mlx-lm LoRA on Apple Silicon", "edge_tune.training.backends.mlx:train",
                _check_mlx, Capabilities(resumable=False, multi_process=False, device="apple",
                                         packs_batches=False, full=True), _skip_mlx),
        Backend("cpu", "torch + PEFT LoRA on the CPU", "edge_tune.training.backends.cpu:train",
                _check_cpu,
                Capabilities(resumable=True, multi_process=True, device="cpu",
                             packs_batches=True, full=True, replay_kl=True)),
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
        raise UsageError("no training backend is available: "
                         + "; ".join(f"{a.name}: {a.reason}" for a in table.values()))
    if requested not in table:
        raise UsageError("unknown (expected auto, "
                         + ", ".join(AUTO_ORDER) + ")", setting="backend", value=repr(requested))
    if not table[requested].available:
        raise UsageError(f"not available here: {table[requested].reason}",
                         setting="backend", value=requested)
    return requested, "requested with --backend"


def capabilities(name: str) -> Capabilities:
    """What backend ``name`` can do (EdgeTuneError for an unknown name)."""
    if name not in BACKENDS:
        raise UsageError(f"backend {name!r}: unknown (expected {', '.join(AUTO_ORDER)})")
    return BACKENDS[name].can


def refuse_unsupported(name: str, cfg, hw: Hardware, resume=None) -> None:
    """Raise (one line) when backend ``name`` cannot run the settings ``cfg`` (a TrainConfig)
    on ``hw``: ``resume`` (the run directory continued) on a backend without checkpoints,
    ``--nproc``/``--nnodes`` on a single-process one, more ranks than this node has GPUs, or
    ``--full`` (UsageError) on one that trains adapters only, ``--replay-kl`` (UsageError) on
    one without the KL term."""
    from edge_tune.errors import UsageError

    can = capabilities(name)
    if resume is not None and not can.resumable:
        raise Unsupported("resuming is supported for the "
                          f"{' and '.join(having('resumable'))} "
                          f"backends; this run uses {name}: start it again",
                          setting="resume", value=resume)
    if (cfg.nproc > 1 or cfg.nnodes > 1) and not can.multi_process:
        raise Unsupported(f"--nproc/--nnodes: multi-process training runs on the cpu (gloo) "
                          f"and unsloth (NCCL) backends, not {name}")
    if can.device == "cuda" and cfg.nproc > len(hw.cuda_gpus):
        raise UsageError(f"the {name} backend runs one process per GPU "
                         f"and this node has {len(hw.cuda_gpus)}", setting="nproc", value=cfg.nproc)
    if cfg.full and not can.full:
        raise UsageError(f"full fine-tuning runs on the {' and '.join(having('full'))} "
                         f"backends, not {name}: add --backend cpu", setting="full")
    if cfg.optimizer not in can.optimizers:
        raise UsageError(f"the {name} backend has {', '.join(can.optimizers)}", setting="optimizer",
                         value=cfg.optimizer)
    if cfg.method == "grpo":
        _refuse_grpo(name, cfg)
    if cfg.replay_kl and not can.replay_kl:
        raise UsageError("the KL-to-base term runs on the "
                         f"{' and '.join(having('replay_kl'))} backend, not {name}: add "
                         f"--backend cpu, or drop --replay-kl", setting="replay_kl")


def _refuse_grpo(name: str, cfg) -> None:
    """GRPO runs on the cpu backend, one process; its rewards parse (one line for a bad one,
    before any model loads)."""
    from edge_tune.errors import UsageError
    from edge_tune.training.rewards import parse_rewards

    if name != "cpu":
        raise UsageError(f"--method grpo runs on the cpu backend (llama.cpp rollouts, torch "
                         f"update), not {name}: add --backend cpu")
    if cfg.nproc > 1 or cfg.nnodes > 1:
        raise UsageError("--method grpo: one training process (its rollout engine is in it); "
                         "drop --nproc/--nnodes")
    if cfg.save_total_limit:
        raise UsageError("--method grpo keeps no checkpoint-STEP folders: drop "
                         "--save-total-limit", setting="save_total_limit")
    parse_rewards(cfg.reward, [float(w) for w in cfg.reward_weights])


def having(capability: str) -> tuple[str, ...]:
    """The backends (in ``auto`` order) with a true boolean ``capability``, e.g.
    ``having("resumable")``: for messages that name them."""
    if capability not in {f.name for f in fields(Capabilities)}:
        raise AttributeError(f"no backend capability {capability!r}")
    return tuple(n for n in AUTO_ORDER if getattr(BACKENDS[n].can, capability) is True)


def preload(name: str) -> None:
    """Import a backend's ``preload`` modules (first thing in the training subprocess)."""
    for module in BACKENDS[name].preload:
        importlib.import_module(module)


def load_entry(name: str) -> TrainFn:
    """Import a backend's training function (called inside the training subprocess)."""
    entry = BACKENDS[name].entry
    if entry is None:
        raise UsageError(f"backend {name!r} is not part of this release")
    module, func = entry.split(":")
    return getattr(importlib.import_module(module), func)
