"""Run tracking: a run's metrics to TensorBoard, Weights & Biases or MLflow, and ``loss.png``.

The parent process sees every backend's ``Metric`` events (the training subprocess streams them
as JSON lines, :mod:`edge_tune.training.runner`), so tracking sits there: :meth:`Tracker.sink` wraps the
front end's event sink and also hands each metric to the chosen tracker. Tags: ``train/loss``,
``train/learning_rate``, ``train/tokens_per_second``, ``val/loss``; the step is the optimizer
step (1-based).

* ``tensorboard`` (the default): event files in ``RUN/tb`` (``tensorboard --logdir RUN/tb``),
  written with ``torch.utils.tensorboard.SummaryWriter`` (tensorboardX's where torch is
  absent); without the ``tensorboard`` package a warning says what to install, and training
  goes on.
* ``wandb``: offline by default (``RUN/wandb``, ``wandb sync`` uploads it later); set
  ``WANDB_MODE=online`` to stream. ``mlflow``: MLflow's SQLite store ``RUN/mlflow.db``
  unless ``MLFLOW_TRACKING_URI`` is set. A tracker that fails to start or write is a
  warning: training goes on. Asked for without its package: one line naming the
  ``pip install``, before anything runs (:func:`check`).
* ``none``: no tracker.

``RUN/loss.png`` (train and validation loss over steps, matplotlib's Agg backend) is written
when the run ends, finished or cancelled, whatever the tracker.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

from edge_tune.errors import UsageError
from edge_tune.events import EventSink, Log, Metric

TB_DIR = "tb"
LOSS_PNG = "loss.png"
_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check(report_to: str) -> None:
    """Raise UsageError when ``report_to`` names a tracker whose package is not installed
    (tensorboard excepted: it is the default, so its absence is a warning at run time)."""
    package = _PACKAGES.get(report_to)
    if package and not _installed(package):
        raise UsageError(f"the {package} package is not installed "
                         f"(pip install {package}; or --report-to tensorboard|none)",
                         setting="report_to", value=report_to)
    if report_to == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI") and not (
            _installed("sqlalchemy") and _installed("alembic")):  # mlflow-skinny has neither
        raise UsageError("MLflow's SQLite store (RUN/mlflow.db) needs sqlalchemy and alembic "
                         "(pip install mlflow, or pip install sqlalchemy alembic; or set "
                         "MLFLOW_TRACKING_URI)", setting="report_to", value="mlflow")


class Tracker:
    """One run's tracking in the parent process. ``sink(on_event)`` gives the sink to run the
    training with; :meth:`close` ends the tracker's run and writes ``loss.png``.

    ``history``: the (split, step, loss) points seen, for the picture."""

    def __init__(self, report_to: str, run_dir: Path, config: dict, on_event: EventSink) -> None:
        self.report_to = report_to
        self.run_dir = Path(run_dir)
        self.config = config
        self.on_event = on_event
        self.history: list[tuple[str, int, float]] = []
        self._writer = None  # made at the first metric: a run refused before it leaves nothing
        self._failed = False
        self._hook_before = None  # threading.excepthook before TensorBoard's writer thread

    def sink(self, on_event: EventSink) -> EventSink:
        def relay(event) -> None:
            if isinstance(event, Metric):
                self.history.append((event.split, event.step, event.loss))
                self._log(event)
            on_event(event)

        return relay

    # --- the trackers -------------------------------------------------------------------------

    def _log(self, m: Metric) -> None:
        if self.report_to == "none" or self._failed:
            return
        if self._writer is None:
            try:
                self._writer = self._open()
            except ImportError as exc:
                self._give_up(f"{exc}; pip install {self.report_to}")
                return
            except Exception as exc:  # the tracker's own store or setup: training goes on
                self._give_up(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                return
        try:
            self._write(m)
        except Exception as exc:
            self._give_up(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")

    def _give_up(self, why: str) -> None:
        self._failed = True
        self.on_event(Log(f"--report-to {self.report_to}: metrics not written ({why})",
                          "warning"))

    def _write(self, m: Metric) -> None:
        scalars = {f"{m.split}/loss": m.loss}
        if m.split == "train":
            scalars.update({"train/learning_rate": m.learning_rate,
                            "train/tokens_per_second": m.tokens_per_second})
        if m.rl:  # a GRPO run: rewards, KL, lengths, clip and IS ratios
            scalars.update({f"{m.split}/{k}": v for k, v in m.rl.items()})
        if m.reward_margin is not None:  # a preference run (DPO/ORPO)
            scalars.update({f"{m.split}/reward_margin": m.reward_margin,
                            f"{m.split}/reward_accuracy": m.reward_accuracy})
        kind, writer = self._writer
        if kind == "tensorboard":
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, m.step)
            writer.flush()
        elif kind == "wandb":
            writer.log(scalars, step=m.step)
        elif kind == "mlflow":
            writer.log_metrics(scalars, step=m.step)

    def _open(self):
        if self.report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from tensorboardX import SummaryWriter
            self._quiet_writer_threads()
            return "tensorboard", SummaryWriter(log_dir=str(self.run_dir / TB_DIR))
        if self.report_to == "wandb":
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            # silent, console "off": wandb neither prints its banners nor wraps this
            # process's stdout/stderr (the CLI's progress and the TUI own them)
            run = wandb.init(project="edge-tune", name=self.run_dir.name,
                             dir=str(self.run_dir), config=self.config,
                             settings=wandb.Settings(silent=True, console="off"))
            return "wandb", run
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):  # MLflow's local store: SQLite
            mlflow.set_tracking_uri(f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}")
        mlflow.start_run(run_name=self.run_dir.name)
        mlflow.log_params({k: str(v)[:250] for k, v in self.config.items()})
        return "mlflow", mlflow

    def _quiet_writer_threads(self) -> None:
        """TensorBoard writes event files from its own thread; a full disk there would print
        a thread traceback into the CLI's output. Such a failure becomes one warning (the
        run's own disk-full handling says the rest); any other thread error is left to the
        hook that was there."""
        import threading

        before = threading.excepthook

        def hook(args) -> None:
            from edge_tune.fsutil import is_disk_full

            if args.exc_value is not None and is_disk_full(args.exc_value):
                if not self._failed:
                    self._give_up(f"no space left on device in {self.run_dir / TB_DIR}")
                return
            before(args)

        self._hook_before = before
        threading.excepthook = hook

    def close(self, train_losses: Optional[list[float]] = None) -> None:
        """End the tracker's run and write ``loss.png``. ``train_losses``: the whole run's
        train loss per step (a resumed run's result has the steps before the resume too)."""
        if self._writer is not None:
            kind, writer = self._writer
            if kind == "tensorboard":
                try:
                    writer.close()
                except Exception as exc:  # noqa: BLE001 - a full disk at the last flush
                    self._give_up(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            elif kind == "wandb":
                writer.finish()
            else:
                writer.end_run()
            self._writer = None
        if self._hook_before is not None:
            import threading

            threading.excepthook, self._hook_before = self._hook_before, None
        if not self.run_dir.is_dir():  # a run refused before it started leaves no folder
            return
        train = [(s, v) for split, s, v in self.history if split == "train"]
        if train_losses:
            train = list(enumerate(train_losses, start=1))
        val = [(s, v) for split, s, v in self.history if split == "val"]
        if train or val:
            try:
                write_loss_png(self.run_dir / LOSS_PNG, train, val)
            except ImportError:
                self.on_event(Log("loss.png: not written (pip install matplotlib)", "warning"))


def write_loss_png(path: Path, train: list[tuple[int, float]],
                   val: list[tuple[int, float]]) -> Path:
    """Train and validation loss against the optimizer step, as a PNG (800 x 480 px), written
    all or nothing. ``train`` / ``val``: (step, loss) points."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the file only
    from matplotlib.figure import Figure

    from edge_tune.fsutil import atomic_path

    fig = Figure(figsize=(8, 4.8), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", color="tab:blue", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), label="validation", color="tab:orange", marker="o", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per trained token)")
    ax.set_title(f"{Path(path).parent.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(str(tmp), format="png")
    return Path(path)
