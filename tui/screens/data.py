"""Model & data: pick the base model, its chat template and a data file, and see it as
training will (``edge-tune data inspect``): format, counts, length histogram, the first example
with its trained characters highlighted, and the bad records with their line numbers. The
screen says when the chosen model has no chat template of its own (``--chat-template``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from edge_tune.tui.widgets import BaseScreen, FilePicker, error_text, render_with
from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Input, Label, Select, Static

from edge_tune.events import Progress

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
BASE_KINDS = [("default (embedded SmolLM2-135M)", "default"), ("GGUF file", "gguf"),
              ("HF model directory", "hf"), ("hub ID", "hub")]
PLACEHOLDER = {"default": "", "gguf": "path/to/model.gguf (ctrl+o: browse)",
               "hf": "path/to/hf-model-dir (ctrl+o: browse)",
               "hub": "e.g. HuggingFaceTB/SmolLM2-135M-Instruct (needs a network)"}


def demo_data_path() -> str:
    from edge_tune.demo import demo_data

    return str(demo_data())


TEMPLATE_TIP = ("chat template: the model's own, a built-in name (chatml, smollm2, llama3, "
                "qwen2, qwen3, gemma, gemma2, phi3, mistral) or a .jinja file")


def template_advice(fitting: list[str] | None) -> str:
    """What the template note says for a model without a chat template: the built-ins that
    fit its vocabulary (``model_template()["fitting"]``), its family's own first; never one
    whose turn markers the model lacks (ChatML on a Gemma)."""
    if fitting:
        also = f"; also fits: {', '.join(fitting[1:])}" if fitting[1:] else ""
        return f" model has none: give {fitting[0]} (fits its vocabulary{also})"
    if fitting is not None:
        return " model has none, and no built-in fits its vocabulary: give a .jinja file"
    return " model has none: give a built-in name or a .jinja file"


class DataScreen(BaseScreen):
    SCREEN_NAME = "data"
    BINDINGS: ClassVar[list] = [Binding("ctrl+o", "browse", "Browse"), Binding("ctrl+l", "demo", "Demo data"),
                Binding("ctrl+r", "inspect", "Inspect"),
                Binding("ctrl+n", "next", "Next: train")]
    DEFAULT_CSS = """
    DataScreen .row { height: 1; margin: 0 1; }
    #base-kind { width: 36; }
    #chat-template { width: 24; }
    #template-row { height: auto; }  /* the note wraps rather than being cut at 80 columns */
    #template-note { width: 1fr; }
    #seq-len { width: 8; }
    #format { width: 16; }
    #status { height: auto; margin: 0 1; color: $text-muted; }  /* errors wrap, never cut */
    #out { padding: 0 1; }
    """

    def body(self):
        with Horizontal(classes="row"):
            yield Label("base model", classes="label")
            yield Select(BASE_KINDS, value="default", allow_blank=False, compact=True,
                         id="base-kind")
            yield Input(placeholder="", compact=True, id="base-path", disabled=True)
        with Horizontal(classes="row", id="template-row"):
            yield Label("template", classes="label")
            yield Input(placeholder="the model's own", compact=True, id="chat-template",
                        tooltip=TEMPLATE_TIP)
            yield Label("", classes="hint", id="template-note")
        with Horizontal(classes="row"):
            yield Label("data file", classes="label")
            yield Input(placeholder="path to .jsonl/.json/.csv/.parquet/.txt - ctrl+o browse, "
                        "ctrl+l demo", compact=True, id="data-path")
        with Horizontal(classes="row"):
            yield Label("seq-len", classes="label")
            yield Input("512", compact=True, id="seq-len", type="integer")
            yield Label(" format ", classes="hint")
            yield Select([(f, f) for f in ("auto", "openai", "sharegpt", "alpaca", "completion",
                                           "text")], value="auto", allow_blank=False,
                         compact=True, id="format")
            yield Label("  enter or ctrl+r inspects", classes="hint")
        yield Static("", id="status")
        with VerticalScroll(id="out-scroll"):
            yield Static("", id="out")
            yield Static("", id="bad")

    def on_mount(self) -> None:
        self.query_one("#data-path", Input).value = self.session.data
        self.query_one("#seq-len", Input).value = str(self.session.seq_len)
        self.query_one("#chat-template", Input).value = self.session.chat_template or ""
        self._note_template(self.session.model)

    # --- choosing ---------------------------------------------------------------------------
    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "base-kind":
            kind = str(event.value)
            box = self.query_one("#base-path", Input)
            box.disabled = kind == "default"
            box.placeholder = PLACEHOLDER[kind]
            if kind != "default":
                box.focus()
        self._sync()
        self._note_template(self.session.model)

    def on_input_changed(self, event: Input.Changed) -> None:
        before = self.session.model
        self._sync()
        if event.input.id == "base-path" and self.session.model != before:
            self._note_template(self.session.model)

    # --- the chat template ------------------------------------------------------------------
    @work(thread=True, exclusive=True, exit_on_error=False, group="template")
    def _note_template(self, model: str) -> None:
        """Say next to the template box whether ``model`` brings a chat template (a GGUF's
        header or an HF directory's files are read; nothing is loaded)."""
        try:
            info = self.core.model_template(model)
        except Exception:  # noqa: BLE001 - a half-typed path: no note
            info = None
        self.app.call_from_thread(self._show_template_note, info)

    def _show_template_note(self, info: dict | None) -> None:
        note = self.query_one("#template-note", Label)
        if info is None or info.get("known") is False:
            note.update("")
        elif info.get("has"):
            note.update(Text(f" model has its own ({info.get('name') or 'custom'})", "dim"))
        else:  # only names the model can use: their turn markers are tokens of its vocabulary
            note.update(Text(template_advice(info.get("fitting")), "yellow"))
        fits = info.get("fitting") if info and not info.get("has") else None
        self.query_one("#chat-template", Input).tooltip = TEMPLATE_TIP if not fits else (
            f"chat template: a built-in that fits this model ({', '.join(fits)}) or a "
            ".jinja file")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_inspect()

    def _sync(self) -> None:
        """Copy the choices into the session (the Train screen reads them)."""
        kind = self.query_one("#base-kind", Select).value
        path = self.query_one("#base-path", Input).value.strip()
        self.session.model = "default" if kind == "default" else (path or "default")
        self.session.data = self.query_one("#data-path", Input).value.strip()
        self.session.data_format = str(self.query_one("#format", Select).value)
        self.session.chat_template = self.query_one("#chat-template", Input).value.strip() \
            or None
        try:
            self.session.seq_len = int(self.query_one("#seq-len", Input).value)
        except ValueError:
            pass

    def action_demo(self) -> None:
        self.query_one("#data-path", Input).value = demo_data_path()
        self.action_inspect()

    def action_browse(self) -> None:
        kind = self.query_one("#base-kind", Select).value
        focused = self.focused
        if focused is not None and focused.id in ("base-path", "base-kind") and kind in (
                "gguf", "hf"):
            target, suffixes, dirs = "#base-path", ((".gguf",) if kind == "gguf" else ()), \
                kind == "hf"
            title = "pick a GGUF model" if kind == "gguf" else "pick an HF model directory"
        else:
            target, suffixes, dirs, title = "#data-path", DATA_SUFFIXES, True, "pick a data file"
        current = self.query_one(target, Input).value.strip()
        start = Path(current).expanduser() if current else Path.cwd()

        def picked(path: Path | None) -> None:
            if path is not None:
                self.query_one(target, Input).value = str(path)
                if target == "#data-path":
                    self.action_inspect()

        self.app.push_screen(FilePicker(start if start.exists() else Path.cwd(), suffixes,
                                        dirs=dirs, title=title), picked)

    def action_next(self) -> None:
        self.app.switch_mode("train")

    # --- inspecting -------------------------------------------------------------------------
    def action_inspect(self) -> None:
        self._sync()
        if not self.session.data:
            self.query_one("#status", Static).update(
                Text("choose a data file first (ctrl+o browse, ctrl+l demo data)", "yellow"))
            return
        self.query_one("#status", Static).update(f"inspecting {self.session.data} ...")
        self.query_one("#out", Static).update("")
        self.query_one("#bad", Static).update("")
        self._inspect(self.session.data, self.session.model, self.session.seq_len,
                      self.session.data_format, self.session.chat_template)

    @work(thread=True, exclusive=True, exit_on_error=False, group="inspect")
    def _inspect(self, path: str, model: str, seq_len: int, fmt: str,
                 chat_template: str | None = None) -> None:
        def on_event(event) -> None:
            if isinstance(event, Progress):
                done = f" {event.completed:.0f}/{event.total:.0f}" if event.total else ""
                self.app.call_from_thread(self.query_one("#status", Static).update,
                                          f"{event.description or event.task}{done}")

        try:
            extra = {"chat_template": chat_template} if chat_template else {}
            report = self.core.inspect_data(path, model=model, seq_len=seq_len, fmt=fmt,
                                            on_event=on_event, **extra)
        except Exception as exc:  # noqa: BLE001 - shown in the UI, never a crash
            self.app.call_from_thread(self._failed, exc, path, fmt)
            return
        self.app.call_from_thread(self._show, report)

    def _failed(self, exc: BaseException, path: str, fmt: str) -> None:
        self.show_error(exc, self.query_one("#status", Static))
        self._list_bad(path, fmt)

    @work(thread=True, exclusive=True, exit_on_error=False, group="bad")
    def _list_bad(self, path: str, fmt: str) -> None:
        try:
            bad = self.core.bad_records(path, fmt)
        except Exception as exc:  # noqa: BLE001
            bad = [{"line": None, "message": error_text(exc)}]
        self.app.call_from_thread(self._show_bad, bad)

    def _show_bad(self, bad: list[dict]) -> None:
        if not bad:
            self.query_one("#bad", Static).update("")
            return
        text = Text(f"bad records ({len(bad)}):\n", style="bold red")
        for row in bad[:200]:
            where = f"line {row['line']}: " if row.get("line") else ""
            text.append(f"  {where}", style="bold")
            text.append(f"{row['message']}\n")
        if len(bad) > 200:
            text.append(f"  ... and {len(bad) - 200} more\n")
        text.append("train with --skip-invalid (Train screen: 'skip invalid') to skip them",
                    style="dim")
        self.query_one("#bad", Static).update(text)

    def _show(self, report: dict) -> None:
        from edge_tune.render.inspect import render_inspect

        self.session.report = report
        self.query_one("#out", Static).update(render_with(render_inspect, report))
        self.query_one("#status", Static).update(
            Text(f"{report['records']} records, {report['format']} - ready to train "
                 "(F3 / ctrl+n)", style="green"))
        self.query_one("#bad", Static).update("")
        if report.get("skipped"):
            self._list_bad(report["path"], self.session.data_format)
