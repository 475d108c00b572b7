"""Events the core emits while it works; front ends only render them.

Plain dataclasses, no UI imports, JSON round-trippable so that the training subprocess can
stream them as JSON lines (see :mod:`edge_tune.training.runner`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from edge_tune.errors import ExitCode


@dataclass
class Log:
    message: str
    level: str = "info"  # info | warning | debug


@dataclass
class Progress:
    """Progress of one named task (download, load, train, export...)."""

    task: str
    completed: float
    total: Optional[float] = None
    unit: str = ""
    description: str = ""


@dataclass
class Metric:
    """A training report: one per optimizer step (or eval)."""

    step: int
    total_steps: int
    loss: float
    tokens_per_second: float = 0.0
    eta_seconds: float = 0.0
    learning_rate: float = 0.0
    epoch: float = 0.0
    split: str = "train"  # train | val
    # preference runs (DPO/ORPO): mean implicit reward of chosen minus rejected answers, and
    # the share of pairs where the chosen one's is higher; None for SFT
    reward_margin: Optional[float] = None
    reward_accuracy: Optional[float] = None
    # GRPO runs: name -> value of the step's rollouts (edge_tune.training.backends.cpu_grpo:
    # reward mean/std, each reward function's, kl, completion_length, clip_ratio,
    # is_ratio_mean/max); None otherwise
    rl: Optional[dict] = None


@dataclass
class Done:
    """A task finished; ``result`` is JSON-safe."""

    task: str
    result: dict = field(default_factory=dict)


@dataclass
class Failed:
    """A task failed with a user-facing one-line message."""

    message: str
    exit_code: int = ExitCode.BAD_INPUT


Event = Log | Progress | Metric | Done | Failed
EventSink = Callable[[Event], None]

_TYPES = {cls.__name__.lower(): cls for cls in (Log, Progress, Metric, Done, Failed)}


def ignore(event: Event) -> None:  # the default sink
    """Drop an event (headless callers that only want the return value)."""


def to_json(event: Event) -> str:
    return json.dumps({"type": type(event).__name__.lower(), **dataclasses.asdict(event)})


def from_json(line: str) -> Event:
    """Parse one JSON line written by :func:`to_json`; raises ValueError on anything else."""
    data: dict[str, Any] = json.loads(line)
    cls = _TYPES.get(data.pop("type", None))
    if cls is None:
        raise ValueError(f"not an edge-tune event: {line[:80]!r}")
    return cls(**data)
