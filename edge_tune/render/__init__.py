"""Rich rendering for the front ends: core events in the terminal (:class:`Renderer`, used by
the CLI) and, one module each, the reports of ``doctor``, ``plan``, ``data inspect``, ``eval``
and ``demo`` (printed by the CLI, shown in widgets by the TUI). The core never imports this
package (an import contract in ``pyproject.toml``)."""

from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.progress import (BarColumn, Progress, SpinnerColumn, TaskID,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)

from edge_tune.events import Done, Event, Failed, Log, Metric
from edge_tune.events import Progress as ProgressEvent


def _rewards(m: Metric) -> str:
    """A preference run's reward margin and accuracy, a GRPO run's reward, KL, completion
    length, clip and importance-sampling ratios ("" for SFT)."""
    if m.rl:
        r = m.rl
        each = "".join(f"  {k[7:]} {v:.2f}" for k, v in r.items()
                       if k.startswith("reward/") and not k.endswith("/std"))
        return (f"  reward {r.get('reward', 0):.3f}±{r.get('reward_std', 0):.2f}{each}"
                f"  flat {100 * r.get('frac_reward_zero_std', 0):.0f}%"
                f"  kl {r.get('kl', 0):.4f}  len {r.get('completion_length', 0):.0f}"
                f"  clip {100 * r.get('clip_ratio', 0):.0f}%"
                f"  IS {r.get('is_ratio_mean', 1):.3f}/{r.get('is_ratio_max', 1):.2f}")
    if m.reward_margin is None:
        return ""
    return f"  margin {m.reward_margin:+.3f}  acc {100 * (m.reward_accuracy or 0):.0f}%"


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


class Renderer:
    """An event sink that draws progress bars and a live training line."""

    def __init__(self, console: Optional[Console] = None, quiet: bool = False) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, transient=False, disable=quiet)
        self.tasks: dict[str, TaskID] = {}
        self.last_metric: Optional[Metric] = None
        self._last_log_step = 0.0

    def __enter__(self) -> "Renderer":
        return self

    def __exit__(self, *exc) -> None:
        if self.tasks:
            self.progress.stop()

    def _task(self, key: str, description: str, total: Optional[float]) -> TaskID:
        if not self.tasks:
            self.progress.start()  # lazily: an early error must not leave an empty live line
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(description, total=total, status="")
        return self.tasks[key]

    def __call__(self, event: Event) -> None:
        if isinstance(event, Log):
            if event.level == "debug":
                return
            style = {"warning": "yellow"}.get(event.level, "dim")
            prefix = "warning: " if event.level == "warning" else ""
            self.progress.console.print(f"[{style}]{prefix}{event.message}[/]", highlight=False)
        elif isinstance(event, ProgressEvent):
            tid = self._task(event.task, event.description or event.task, event.total)
            status = ""
            if event.unit == "B" and event.total:
                status = f"{event.completed / 2**20:.0f}/{event.total / 2**20:.0f} MiB"
            elif event.total:
                status = f"{_count(event.completed)}/{_count(event.total)} {event.unit}".strip()
            self.progress.update(tid, completed=event.completed, total=event.total,
                                 description=event.description or event.task, status=status)
        elif isinstance(event, Metric) and event.split == "val":
            self.progress.console.print(f"step {event.step}/{event.total_steps}  validation loss "
                                        f"{event.loss:.3f}{_rewards(event)}", highlight=False)
        elif isinstance(event, Metric):
            self.last_metric = event
            tid = self._task("train", "training", event.total_steps)
            status = (f"step {event.step}/{event.total_steps}  loss {event.loss:.3f}"
                      f"{_rewards(event)}  {event.tokens_per_second:.0f} tok/s  "
                      f"ETA {_fmt_eta(event.eta_seconds)}")
            self.progress.update(tid, completed=event.step, total=event.total_steps,
                                 status=status)
            # Keep a scroll-back record every ~10% when the output is not a terminal.
            if not self.console.is_terminal and (
                    event.step == event.total_steps or
                    event.step - self._last_log_step >= max(1, event.total_steps // 10)):
                self._last_log_step = event.step
                self.console.print(status, highlight=False)
        elif isinstance(event, (Done, Failed)):
            for key, tid in self.tasks.items():
                task = self.progress.tasks[tid]
                if task.total is None:
                    self.progress.update(tid, total=1, completed=1)


def _count(value: float) -> str:
    """A progress count: whole numbers in full (1,048,576, not 1.04858e+06), others as %g."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:g}"

