"""Train: the hyperparameters, the planner's estimate, and a live run: loss chart (train and
validation), tokens/s, ETA and the log. Start runs ``api.train`` in a worker thread (training
itself is a subprocess); Cancel leaves a checkpoint; Resume continues it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import ClassVar

from edge_tune.tui.widgets import BaseScreen, LossChart, error_text
from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.widgets import Checkbox, Input, Label, RichLog, Static

from edge_tune.errors import Cancelled
from edge_tune.events import Done, Log, Metric, Progress

# the TrainConfig settings the form shows, four to a row; each field's label, tooltip and
# default come from the setting's declaration (edge_tune.config.option). Values are typed in
# as text and validated by the core.
FIELDS = ["epochs", "max_steps", "lr", "batch_size", "rank", "alpha", "seq_len", "val_split",
          "seed", "save_every", "replay"]


def _fid(key: str) -> str:
    """A setting's widget id: its flag's spelling (``max_steps`` -> ``max-steps``)."""
    return key.replace("_", "-")


def _described(key: str) -> tuple[str, Text]:
    """(label, tooltip) of a setting: the form's short label and tip where the declaration
    gives them, else its name and its ``train --help`` text; replay's tip names its limit."""
    from dataclasses import fields

    from edge_tune.config import TrainConfig
    from edge_tune.replay import max_replay

    meta = next(f for f in fields(TrainConfig) if f.name == key).metadata
    tip = meta.get("tip", meta["help"])
    return (meta.get("label", key.replace("_", " ")),
            Text(tip.format(max=max_replay()) if key == "replay" else tip))


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def _rewards(m: Metric) -> str:
    """A preference run's (DPO/ORPO) reward margin and accuracy, as the CLI shows them; ""
    for SFT."""
    if m.reward_margin is None:
        return ""
    return f" (margin {m.reward_margin:+.2f}, acc {100 * (m.reward_accuracy or 0):.0f}%)"


class TrainScreen(BaseScreen):
    SCREEN_NAME = "train"
    BINDINGS: ClassVar[list] = [Binding("ctrl+s", "start", "Start", priority=True),
                Binding("ctrl+k", "cancel", "Cancel", priority=True),
                Binding("ctrl+r", "resume", "Resume", priority=True),
                Binding("ctrl+l", "clear", "Clear chart", show=False)]
    DEFAULT_CSS = """
    #top { height: 45%; min-height: 10; }
    #form-col { width: 44; }
    #form { grid-size: 4; grid-columns: 10 11 10 11; grid-rows: 1; grid-gutter: 0 1;
            height: 6; margin: 0 1 0 0; }
    #form Label { color: $text-muted; }
    #out-row, #checks { height: 1; }
    #checks Checkbox { margin: 0 1 0 0; }
    #out-row Label { width: 10; color: $text-muted; }
    /* the plan line and the messages wrap over the full width: a long GGUF path or a field's
       error is read whole, never cut (at 80x24 too) */
    #plan { height: auto; padding: 0 1; color: $text-muted; }
    #chart { width: 1fr; }
    #stats { height: auto; padding: 0 1; background: $boost; }
    #log { height: 1fr; }
    """

    def __init__(self) -> None:
        super().__init__()
        self._cancel: threading.Event | None = None
        self.running = False
        self.finished_runs = 0  # grows by one when a run ends (done, cancelled or failed)
        self.last_metric: Metric | None = None
        self.last_val: Metric | None = None  # the latest validation point
        self._plan_timer = None
        self._plan_asked = 0  # bumped by every change: a late estimate for old values is dropped

    def body(self):
        from edge_tune.config import TrainConfig

        d = TrainConfig()
        with Horizontal(id="top"):
            with Vertical(id="form-col"):
                with Grid(id="form"):
                    for key in FIELDS:
                        value = getattr(d, key)
                        label, tip = _described(key)
                        yield Label(label)
                        box = Input("" if value is None else f"{value:g}"
                                    if isinstance(value, float) else str(value),
                                    placeholder="-" if value is None else "", compact=True,
                                    id=_fid(key), validate_on=())  # marked by _mark_field
                        box.tooltip = tip
                        yield box
                with Horizontal(id="out-row"):
                    yield Label("run dir")
                    yield Input(placeholder="runs/run-DATE (new)", compact=True, id="out")
                with Horizontal(id="checks"):
                    yield Checkbox("skip invalid", value=d.skip_invalid, compact=True,
                                   id="skip-invalid", tooltip=_described("skip_invalid")[1])
                    yield Checkbox("verify after", value=d.verify, compact=True, id="verify",
                                   tooltip=_described("verify")[1])
            yield LossChart(id="chart")
        yield Static("", id="plan")
        yield Static("ready: ctrl+s starts training", id="stats")
        yield RichLog(id="log", wrap=True, max_lines=1000, markup=False)

    def on_screen_resume(self) -> None:
        s = self.session
        self.query_one("#seq-len", Input).value = str(s.seq_len)
        self._update_plan()
        self.refresh_bindings()
        if s.extra.pop("resume", False):  # Adapters: t
            self.action_resume()

    def check_action(self, action: str, parameters) -> bool | None:
        if action in ("start", "resume"):
            return None if self.running else True  # None: shown, greyed out
        if action == "cancel":
            return True if self.running else None
        return True

    # --- the form -----------------------------------------------------------------------
    def config(self):
        """A validated TrainConfig from the form and the session (raises EdgeTuneError)."""
        from edge_tune.config import build

        values = {key: (self.query_one(f"#{_fid(key)}", Input).value.strip() or None)
                  for key in FIELDS}
        out = self.query_one("#out", Input).value.strip()
        values["verify"] = self.query_one("#verify", Checkbox).value
        if not out:
            out = str(self.app.runs_root / Path(self.core.default_run_dir()).name)
        return build(None, data=self.session.data or None, model=self.session.model,
                     backend=self.session.backend, format=self.session.data_format,
                     skip_invalid=self.query_one("#skip-invalid", Checkbox).value, out=out,
                     chat_template=self.session.chat_template, **values)

    def _mark_field(self, exc: BaseException | None) -> None:
        """Show the form's field that a core error names (its ``setting``) as invalid, and
        no other; the message itself spells the setting as the command line does."""
        setting = getattr(exc, "setting", None)
        for key in FIELDS:
            self.query_one(f"#{_fid(key)}", Input).set_class(key == setting, "-invalid")

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "seq-len":
            try:
                self.session.seq_len = int(event.value)
            except ValueError:
                pass
        self._update_plan()

    def _update_plan(self) -> None:
        plan = self.app.planner
        box = self.query_one("#plan", Static)
        s = self.session
        self._plan_asked += 1
        if self._plan_timer is not None:  # a newer value: the pending estimate is stale
            self._plan_timer.stop()
            self._plan_timer = None
        what = Text(f"{Path(s.data).name if s.data else 'no data (F2)'} · {s.model} · "
                    f"backend {s.backend}\n")
        what.stylize("bold")  # a span, not the base style: the estimate after it stays plain
        if not s.data:
            box.update(what + Text("estimate: choose the data first (F2)"))
            return
        try:
            cfg = self.config()
        except Exception as exc:  # noqa: BLE001 - an unfinished value while typing
            self._mark_field(exc)
            box.update(what + Text(f"estimate: {error_text(exc)}", style="yellow"))
            return
        self._mark_field(None)
        box.update(what + Text("estimate: ...", style="dim"))
        asked = self._plan_asked  # typing: plan once the value settles
        self._plan_timer = self.set_timer(0.6, lambda: self._plan(plan, cfg, what, asked))

    @work(thread=True, exclusive=True, exit_on_error=False, group="plan")
    def _plan(self, plan, cfg, what: Text, asked: int = 0) -> None:
        try:
            estimate = plan(cfg)
        except Exception as exc:  # noqa: BLE001
            text = Text(f"estimate: {error_text(exc)}", style="yellow")
        else:
            text = Text(estimate["summary"] if isinstance(estimate.get("summary"), str)
                        else "estimate: " + self.format_plan(estimate))
        self.app.call_from_thread(self._show_plan, what + text, asked)

    def _show_plan(self, text: Text, asked: int) -> None:
        if asked == self._plan_asked:  # else the form changed while planning
            self.query_one("#plan", Static).update(text)

    @staticmethod
    def format_plan(estimate: dict) -> str:
        """The planner's numbers, whatever keys it grows: GiB, seconds and steps first."""
        parts = []
        for key, value in estimate.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                continue
            name = key.replace("_", " ")
            if isinstance(value, float) and "gib" in key:
                parts.append(f"{name.replace(' gib', '')} {value:.2f} GiB")
            elif isinstance(value, (int, float)) and ("seconds" in key or key.endswith("_s")):
                parts.append(f"{name.replace(' seconds', '')} {_clock(value)}")
            elif isinstance(value, float):
                parts.append(f"{name} {value:.3g}")
            else:
                parts.append(f"{name} {value}")
        return ", ".join(parts) or "-"

    # --- running ------------------------------------------------------------------------
    def action_start(self) -> None:
        if self.running:
            return
        try:
            cfg = self.config()
        except Exception as exc:  # noqa: BLE001 - a bad value: say which, do not start
            self._mark_field(exc)
            self.show_error(exc, self.query_one("#stats", Static))
            return
        self.session.run_dir = cfg.out
        self.action_clear()
        self.query_one("#log", RichLog).write(f"starting a run in {cfg.out}")
        self._launch(cfg, None)

    def action_resume(self) -> None:
        if self.running:
            return
        run = self._resumable()
        if run is None:
            self.show_error(RuntimeError("nothing to resume: cancel a run first (or pick a "
                                         "cancelled run on the Adapters screen)"),
                            self.query_one("#stats", Static))
            return
        self.session.run_dir = run
        self.query_one("#log", RichLog).write(f"resuming {run}")
        self._launch(None, run)

    def _resumable(self) -> str | None:
        """The session's last run if it can be resumed, else the newest cancelled run."""
        try:
            candidates = ([self.session.run_dir] if self.session.run_dir else []) + [
                r["path"] for r in self.core.list_runs(self.app.runs_root)
                if r["status"] == "cancelled"]
            return next((run for run in candidates
                         if self.core.resume_state(Path(run)) is not None), None)
        except Exception as exc:  # noqa: BLE001 - an unreadable run: say so, resume nothing
            self.show_error(exc)
            return None

    def action_cancel(self) -> None:
        if self._cancel is not None and self.running:
            self._cancel.set()
            self.query_one("#stats", Static).update("cancelling: saving a checkpoint ...")

    def action_clear(self) -> None:
        self.query_one("#chart", LossChart).clear_points()
        self.last_val = None  # the validation shown goes with the chart's points

    def _launch(self, cfg, resume: str | None) -> None:
        self._cancel = threading.Event()
        self.running = True
        self.refresh_bindings()
        self.query_one("#stats", Static).update("starting ...")
        self._train(cfg, resume, self._cancel)

    @work(thread=True, exclusive=True, exit_on_error=False, group="train")
    def _train(self, cfg, resume: str | None, cancel: threading.Event) -> None:
        def on_event(event) -> None:
            self.app.call_from_thread(self.on_core_event, event)

        try:
            result = self.core.train(cfg, on_event, cancel=cancel,
                                     resume=Path(resume) if resume else None)
        except Exception as exc:  # noqa: BLE001 - shown in the UI, never a crash
            self.app.call_from_thread(self._finished, None, exc)
            return
        self.app.call_from_thread(self._finished, result, None)

    def on_core_event(self, event) -> None:
        log = self.query_one("#log", RichLog)
        stats = self.query_one("#stats", Static)
        if isinstance(event, Metric):
            chart = self.query_one("#chart", LossChart)
            chart.add(event.split, event.step, event.loss, event.total_steps)
            if event.split == "train":
                self.last_metric = event
            else:
                self.last_val = event
                if event.reward_margin is not None:  # in full, whatever the width
                    log.write(f"validation at step {event.step}: loss {event.loss:.3f}"
                              f"{_rewards(event)}")
            m, v = self.last_metric, self.last_val
            if m is not None:
                val_text = f"  val {v.loss:.3f}{_rewards(v)}" if v is not None else ""
                stats.update(f"step {m.step}/{m.total_steps}  loss {m.loss:.3f}{_rewards(m)}"
                             f"{val_text}  {m.tokens_per_second:.0f} tok/s  "
                             f"ETA {_clock(m.eta_seconds)}  lr {m.learning_rate:.2g}")
        elif isinstance(event, Progress):
            done = f" {event.completed:.0f}/{event.total:.0f}" if event.total else ""
            stats.update(f"{event.description or event.task}{done}")
        elif isinstance(event, Log):
            style = {"warning": "yellow", "debug": "dim"}.get(event.level, "")
            log.write(Text(event.message, style=style))
        elif isinstance(event, Done) and event.task != "train":  # train: see _finished
            log.write(Text(f"{event.task} done", style="green"))

    def _finished(self, result, exc: BaseException | None) -> None:
        self.running = False
        self.finished_runs += 1
        self.refresh_bindings()
        log = self.query_one("#log", RichLog)
        stats = self.query_one("#stats", Static)
        if exc is None:
            r = result.manifest.result
            self.session.chat_adapter = str(result.run_dir)
            msg = (f"done: {r.steps} steps, final loss {r.final_loss:.3f}, "
                   f"{r.tokens_per_second:.0f} tok/s -> {result.run_dir}")
            stats.update(Text(msg, style="green"))
            log.write(Text(msg + " (F4 adapters, F5 chat)", style="bold green"))
            self.notify(msg, title="training finished")
        elif isinstance(exc, Cancelled):
            msg = f"cancelled: {error_text(exc)}; ctrl+r resumes"
            stats.update(Text(msg, style="yellow"))
            log.write(Text(msg, style="yellow"))
        else:
            log.write(Text(f"error: {error_text(exc)}", style="bold red"))
            self.show_error(exc, stats)
