"""Hardware: the ``doctor`` report, the backend ``auto`` picks and why, and an override."""

from __future__ import annotations

from typing import ClassVar

from edge_tune.tui.widgets import BaseScreen, render_with
from textual import work
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Label, Select, Static


class HardwareScreen(BaseScreen):
    SCREEN_NAME = "hardware"
    BINDINGS: ClassVar[list] = [Binding("r", "refresh", "Refresh"), Binding("b", "backend", "Backend"),
                Binding("n", "next", "Next: model & data")]
    DEFAULT_CSS = """
    #backend-row { height: 1; margin: 0 1; }
    #backend { width: 40; }
    #report { padding: 0 1; }
    """

    def body(self):
        with Horizontal(id="backend-row"):
            yield Label("backend", classes="label")
            yield Select([("auto", "auto")], value="auto", allow_blank=False, compact=True,
                         id="backend")
            yield Label("", id="backend-note", classes="hint")
        with VerticalScroll(id="report-scroll"):
            yield Static("probing the hardware...", id="report")

    def on_mount(self) -> None:
        self.action_refresh()

    def action_refresh(self) -> None:
        self.query_one("#report", Static).update("probing the hardware...")
        self._probe()

    @work(thread=True, exclusive=True, exit_on_error=False)
    def _probe(self) -> None:
        try:
            report = self.core.doctor()
        except Exception as exc:  # noqa: BLE001 - shown in the UI, never a crash
            self.app.call_from_thread(self.show_error, exc, self.query_one("#report", Static))
            return
        self.app.call_from_thread(self._show, report)

    def _show(self, report: dict) -> None:
        from edge_tune.render.doctor import render_doctor

        self.report = report
        self.query_one("#report", Static).update(render_with(render_doctor, report))
        select = self.query_one("#backend", Select)
        options = [("auto", "auto")] + [
            (f"{b['name']}" + ("" if b["available"] else " (not available)"), b["name"])
            for b in report["backends"]]
        select.set_options(options)
        select.value = self.session.backend if any(
            v == self.session.backend for _, v in options) else "auto"
        self._note()

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "backend" and event.value is not Select.BLANK:
            self.session.backend = str(event.value)
            self._note()

    def _note(self) -> None:
        report = getattr(self, "report", None)
        note = ""
        if report and self.session.backend == "auto" and report["auto"]["backend"]:
            note = f"auto picks {report['auto']['backend']}"
        elif report:
            row = next((b for b in report["backends"] if b["name"] == self.session.backend), None)
            if row and not row["available"]:
                note = f"not available here: {row['reason']}"
            else:
                note = "training will use this backend"
        self.query_one("#backend-note", Label).update(note)

    def action_backend(self) -> None:
        self.query_one("#backend", Select).focus()

    def action_next(self) -> None:
        self.app.switch_mode("data")
