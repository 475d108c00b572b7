"""Adapters: the runs on disk with their metrics (manifest.json), and what to do with one:
export (GGUF adapter, merged GGUF + quantization, Ollama), verify (torch vs llama.cpp, with its
numbers), eval (base vs tuned: held-out loss, scored answers, drift), bundle, resume a cancelled run, chat with it, delete it (after a confirmation)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from edge_tune.tui.widgets import BaseScreen, ConfirmScreen, FilePicker, error_text
from rich.table import Table
from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Input, Label, OptionList, RichLog, Static
from textual.widgets.option_list import Option

from edge_tune.events import Log

COLUMNS = ("run", "status", "steps", "loss", "val", "tok/s", "created")


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


class ExportChoice(ModalScreen["dict | None"]):
    """What to export; each choice is a set of ``api.export`` keyword arguments."""

    DEFAULT_CSS = """
    ExportChoice { align: center middle; }
    ExportChoice > Vertical { width: 64; height: auto; max-height: 90%; border: thick $accent;
                              background: $surface; padding: 0 1; }
    ExportChoice OptionList { height: auto; max-height: 12; }
    """
    BINDINGS: ClassVar[list] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, choices: list[tuple[str, dict]]) -> None:
        super().__init__()
        self.choices = choices

    def compose(self):
        with Vertical():
            yield Label("[b]export[/b] - enter picks, escape cancels")
            yield OptionList(*[Option(label, id=str(i)) for i, (label, _) in
                               enumerate(self.choices)], id="choices")
        yield Footer()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.choices[int(event.option.id)][1])

    def action_cancel(self) -> None:
        self.dismiss(None)


class AdaptersScreen(BaseScreen):
    SCREEN_NAME = "adapters"
    BINDINGS: ClassVar[list] = [Binding("e", "export", "Export"), Binding("v", "verify", "Verify"),
                Binding("a", "evaluate", "Eval"), Binding("b", "bundle", "Bundle"), Binding("c", "chat", "Chat"),
                Binding("t", "resume", "Resume"), Binding("d", "delete", "Delete"),
                Binding("r", "refresh", "Refresh"),
                Binding("ctrl+o", "browse_eval_data", "Eval data", show=False)]
    DEFAULT_CSS = """
    #runs { height: 1fr; min-height: 5; }
    #eval-row { height: 1; margin: 0 1; }
    #eval-row Label { width: 11; color: $text-muted; }
    #detail { height: auto; max-height: 9; padding: 0 1; background: $boost; }
    #actions { height: 6; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[dict] = []
        self.busy = False

    def body(self):
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Static("", id="detail")
        with Horizontal(id="eval-row"):  # eval of a run that held nothing back needs a file
            yield Label("eval data")
            yield Input(placeholder="held-out data for eval: a file (ctrl+o); empty: the "
                        "run's own", compact=True, id="eval-data")
        yield RichLog(id="actions", wrap=True, max_lines=500, markup=False)

    def on_mount(self) -> None:
        self.query_one("#runs", DataTable).add_columns(*COLUMNS)

    def on_screen_resume(self) -> None:
        self.action_refresh()
        self.query_one("#runs", DataTable).focus()

    # --- listing ------------------------------------------------------------------------
    def action_refresh(self) -> None:
        table = self.query_one("#runs", DataTable)
        keep = self.selected()
        try:
            self.runs = self.core.list_runs(self.app.runs_root)
        except Exception as exc:  # noqa: BLE001
            self.show_error(exc, self.query_one("#detail", Static))
            self.runs = []
        table.clear()
        for r in self.runs:
            status = r["status"] if r["status"] == "done" else \
                f"{r['status']} @{r.get('step') or 0}"
            steps = f"{r.get('step') or 0}/{r.get('total') or '?'}" if r["status"] != "done" \
                else str(r.get("total") or "-")
            table.add_row(r["name"], status, steps, _num(r.get("final_loss"), ".3f"),
                          _num(r.get("val_loss"), ".3f"), _num(r.get("tokens_per_second"),
                                                              ".0f"),
                          (r.get("created") or "-")[:16].replace("T", " "), key=r["path"])
        if not self.runs:
            self.query_one("#detail", Static).update(
                f"no runs under {self.app.runs_root}/ yet: train one on the Train screen (F3)")
            return
        paths = [r["path"] for r in self.runs]
        if keep and keep["path"] in paths:
            table.move_cursor(row=paths.index(keep["path"]))
        self._detail()

    def selected(self) -> dict | None:
        table = self.query_one("#runs", DataTable)
        if not self.runs or table.cursor_row is None or table.cursor_row >= len(self.runs):
            return None
        return self.runs[table.cursor_row]

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._detail()

    def _detail(self) -> None:
        run = self.selected()
        if run is None:
            return
        hp = run.get("hyperparameters") or {}
        t = Table.grid(padding=(0, 1))
        t.add_column(style="bold")
        t.add_column()
        t.add_row("run", run["path"])
        t.add_row("base / data", f"{run.get('base') or '-'} / {run.get('data') or '-'}")
        t.add_row("settings", f"rank {hp.get('rank')}, alpha {hp.get('alpha')}, lr "
                              f"{hp.get('lr')}, batch {hp.get('batch_size')}, seq-len "
                              f"{hp.get('seq_len')}")
        if run["status"] == "done":
            t.add_row("adapter", run.get("adapter_gguf") or "no adapter.gguf (e: export)")
            secs = run.get("train_seconds")
            t.add_row("trained", f"{secs:.0f} s" if secs is not None else "-")
        else:
            t.add_row("state", f"cancelled at step {run.get('step')}/{run.get('total')}: "
                               "t resumes it")
        self.query_one("#detail", Static).update(t)

    def _need(self, done: bool = True) -> dict | None:
        run = self.selected()
        if run is None:
            self.notify("no run selected", severity="warning")
        elif done and run["status"] != "done":
            self.notify(f"{run['name']} has not finished: resume it first (t)",
                        severity="warning")
            return None
        return run

    # --- actions ------------------------------------------------------------------------
    def export_choices(self) -> list[tuple[str, dict]]:
        choices = [(f"GGUF LoRA adapter ({t})", {"outtype": t}) for t in ("f32", "f16", "q8_0")]
        choices += [(f"merged GGUF, {q}", {"merge": True, "quant": q})
                    for q in ("F16", "Q8_0", "Q4_K_M")]
        # checked like every merged export: the smallest type that passes
        choices.append(("merged GGUF, auto (smallest type that passes the check)",
                        {"merge": True, "quant": "auto"}))
        choices.append(("Ollama Modelfile (adapter + base), into RUN/ollama",
                        {"ollama": "ollama"}))
        return choices

    def action_export(self) -> None:
        run = self._need()
        if run is None or self.busy:
            return

        def chosen(kw: dict | None) -> None:
            if kw is None:
                return
            if kw.get("ollama"):
                kw = dict(kw, ollama=Path(run["path"]) / kw["ollama"])
            if kw.get("merge") and kw["quant"] != "auto":  # auto: named by the type chosen
                kw = dict(kw, out=Path(run["path"]) / f"merged-{kw['quant'].lower()}.gguf")
            self._run_action("export", run, kw)

        self.app.push_screen(ExportChoice(self.export_choices()), chosen)

    def action_verify(self) -> None:
        run = self._need()
        if run is not None and not self.busy:
            self._run_action("verify", run, {})

    def action_evaluate(self) -> None:
        run = self._need()
        if run is not None and not self.busy:
            data = self.query_one("#eval-data", Input).value.strip()
            self._run_action("evaluate", run, {"data": Path(data).expanduser()} if data else {})

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "eval-data":  # enter in the eval data field: evaluate with it
            self.action_evaluate()

    def action_browse_eval_data(self) -> None:
        from edge_tune.tui.screens.data import DATA_SUFFIXES

        box = self.query_one("#eval-data", Input)
        start = Path(box.value.strip()).expanduser() if box.value.strip() else Path.cwd()

        def picked(path: Path | None) -> None:
            if path is not None:
                box.value = str(path)
                box.focus()

        self.app.push_screen(FilePicker(start if start.exists() else Path.cwd(),
                                        DATA_SUFFIXES, title="pick held-out data for eval"),
                             picked)

    def _no_held_out(self) -> None:
        """Eval failed for want of held-out data (the core says "give --data FILE"): the
        field for it takes the focus, and the log says what to do there."""
        self.query_one("#actions", RichLog).write(Text(
            "give held-out examples (a data file in any format train reads) in the 'eval "
            "data' field below the run, then press enter (ctrl+o browses)", "yellow"))
        self.query_one("#eval-data", Input).focus()

    def action_bundle(self) -> None:
        run = self._need()
        if run is not None and not self.busy:
            self._run_action("bundle", run, {})

    def action_chat(self) -> None:
        run = self._need()
        if run is None:
            return
        if not run.get("adapter_gguf"):
            self.notify("this run has no adapter.gguf yet: export it first (e)",
                        severity="warning")
            return
        self.session.chat_adapter = run["path"]
        self.app.switch_mode("chat")

    def action_resume(self) -> None:
        run = self._need(done=False)
        if run is None:
            return
        if run["status"] == "done":
            self.notify("this run has finished: nothing to resume", severity="warning")
            return
        self.session.run_dir = run["path"]
        self.session.extra["resume"] = True  # the Train screen resumes it when it shows
        self.app.switch_mode("train")

    def action_delete(self) -> None:
        run = self._need(done=False)
        if run is None or self.busy:
            return

        def answered(yes: bool | None) -> None:
            if not yes:
                return
            try:
                self.core.delete_run(Path(run["path"]))
            except Exception as exc:  # noqa: BLE001
                self.show_error(exc)
                return
            self.query_one("#actions", RichLog).write(f"deleted {run['path']}")
            self.action_refresh()

        self.app.push_screen(ConfirmScreen(f"Delete {run['path']} and everything in it?"),
                             answered)

    def _run_action(self, what: str, run: dict, kw: dict) -> None:
        self.busy = True
        self.query_one("#actions", RichLog).write(Text(f"{what} {run['name']} ...", "bold"))
        self._work(what, run, kw)

    @work(thread=True, exclusive=True, exit_on_error=False, group="adapter-action")
    def _work(self, what: str, run: dict, kw: dict) -> None:
        log = self.query_one("#actions", RichLog)

        def on_event(event) -> None:
            if isinstance(event, Log):
                self.app.call_from_thread(log.write, event.message)

        path = Path(run["path"])
        try:
            if what == "bundle":  # base + adapter in one folder for an edge box
                out = self.app.runs_root / "bundles" / run["name"]
                result = self.core.bundle([run["path"]], out, on_event=on_event)
            elif what == "export":
                result = self.core.export(path, on_event=on_event, **kw)
            elif what == "verify":
                result = self.core.verify(path, on_event=on_event, **kw)
            else:
                result = self.core.evaluate(path, on_event=on_event, **kw)
        except Exception as exc:  # noqa: BLE001 - shown in the UI, never a crash
            self.app.call_from_thread(log.write, Text(f"error: {error_text(exc)}", "bold red"))
            self.app.call_from_thread(self.show_error, exc)
            if what == "evaluate" and "--data FILE" in error_text(exc):
                self.app.call_from_thread(self._no_held_out)
        else:
            self.app.call_from_thread(self._done, what, result)
        finally:
            self.busy = False

    def _done(self, what: str, result) -> None:
        log = self.query_one("#actions", RichLog)
        if what == "verify":  # edge_tune.verify.VerifyReport
            ok = result.ok
            log.write(Text(
                f"verify: {'ok' if ok else 'OUT OF TOLERANCE'} - adapter effect error "
                f"{result.effect_rel_err:.2e}, top-1 agreement {result.top1:.0%}, mean KL "
                f"{result.kl:.4f} on {result.n_prompts} held-back prompts",
                style="bold green" if ok else "bold red"))
            for failure in result.failures:
                log.write(Text(f"  {failure}", style="red"))
        elif what == "evaluate":  # edge_tune.commands.eval.EvalResult
            for line in eval_lines(result.to_dict()):
                log.write(Text(line))
        elif what == "bundle":
            log.write(Text(f"bundle written: {result}", style="green"))
        else:
            log.write(Text(f"{what} done", style="green"))
        self.action_refresh()


def eval_lines(report: dict) -> list[str]:
    """`edge-tune eval`'s report in three lines: loss, answer scores, drift (base -> tuned)."""
    loss, base, tuned = report["loss"], report["scores"]["base"], report["scores"]["tuned"]
    drift = report["drift"]
    return [f"eval on {report['n_examples']} held-out examples: loss {loss['base']:.3f} -> "
            f"{loss['tuned']:.3f} (base -> tuned)",
            f"  answers: ROUGE-L {base['rouge_l'] or 0:.3f} -> {tuned['rouge_l'] or 0:.3f}, "
            f"exact {base['exact'] or 0:.0%} -> {tuned['exact'] or 0:.0%}, contains "
            f"{base['contains'] or 0:.0%} -> {tuned['contains'] or 0:.0%}",
            f"  drift: mean KL(base||tuned) {drift['mean_kl']:.4f} nats/token on "
            f"{drift['n_prompts']} general prompts, {drift['changed_share']:.0%} of answers "
            "changed (full report: edge-tune eval RUN)"] + \
        ([f"  {drift['hint']}"] if drift.get("hint") else [])
