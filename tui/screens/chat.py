"""Chat: streamed answers from the base model plus an adapter (llama.cpp), a compare mode that
shows the base's and the adapter's answers side by side, a system prompt and a temperature."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from edge_tune.tui.widgets import BaseScreen, error_text
from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Checkbox, Input, Label, Select, Static

BASE_ONLY = "__base__"


class Transcript(VerticalScroll):
    """One column of the conversation; the last answer grows as tokens stream in."""

    DEFAULT_CSS = """
    Transcript { width: 1fr; border: round $panel; padding: 0 1; }
    Transcript > .you { color: $accent; margin-top: 1; }
    """

    def add(self, who: str, text: str = "", css: str = "") -> Static:
        line = Static(Text.assemble((f"{who}> ", "bold"), text), classes=css)
        line.who, line.text = who, text
        self.mount(line)
        self.scroll_end(animate=False)
        return line

    @staticmethod
    def extend(line: Static, piece: str) -> None:
        line.text += piece
        line.update(Text.assemble((f"{line.who}> ", "bold"), line.text))


class ChatScreen(BaseScreen):
    SCREEN_NAME = "chat"
    BINDINGS: ClassVar[list] = [Binding("ctrl+t", "compare", "Compare"),
                Binding("ctrl+a", "pick_adapter", "Adapter", priority=True),
                Binding("ctrl+l", "reset", "New chat"),
                Binding("escape", "stop", "Stop")]
    DEFAULT_CSS = """
    ChatScreen .row { height: 1; margin: 0 1; }
    #adapter { width: 1fr; }
    #temperature { width: 6; }
    #system { width: 1fr; }
    #columns { height: 1fr; }
    #chat-status { height: 1; padding: 0 1; color: $text-muted; }
    #message { margin: 0 1; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.history: list[dict] = []
        self.engine = None
        self.engine_key = None
        self.stop_flag = False
        self.busy = False
        # Answers finished (ok, stopped or failed): a count only grows, so a caller can wait
        # for "one more" without having to catch the short-lived busy state.
        self.answered = 0
        self.picked = False

    def body(self):
        with Horizontal(classes="row"):
            yield Label("adapter", classes="label")
            yield Select([("base model only", BASE_ONLY)], value=BASE_ONLY, allow_blank=False,
                         compact=True, id="adapter")
            yield Label(" temp ", classes="hint")
            yield Input("0.7", compact=True, id="temperature")
            yield Checkbox("compare", compact=True, id="compare")
        with Horizontal(classes="row"):
            yield Label("system", classes="label")
            yield Input(placeholder="system prompt (optional)", compact=True, id="system")
        with Horizontal(id="columns"):
            yield Transcript(id="left")
            yield Transcript(id="right")
        yield Static("", id="chat-status")
        yield Input(placeholder="type a message, enter sends", id="message")

    def on_mount(self) -> None:
        self.query_one("#right").display = False

    def on_screen_resume(self) -> None:
        self.refresh_adapters()
        self.query_one("#message", Input).focus()

    def refresh_adapters(self) -> None:
        try:
            runs = [r for r in self.core.list_runs(self.app.runs_root) if r.get("adapter_gguf")]
        except Exception as exc:  # noqa: BLE001
            self.show_error(exc, self.query_one("#chat-status", Static))
            runs = []
        select = self.query_one("#adapter", Select)
        options = [("base model only", BASE_ONLY)] + [
            (f"{r['name']} (loss {r['final_loss']:.3f})" if r.get("final_loss") is not None
             else r["name"], r["path"]) for r in runs]
        # an adapter picked elsewhere (Adapters: c, a finished run), else the one chosen
        # here before, else the newest adapter
        keep = self.session.chat_adapter or (select.value if self.picked else None)
        select.set_options(options)
        values = [v for _, v in options]
        select.value = keep if keep in values else (values[1] if len(values) > 1 else BASE_ONLY)
        self.session.chat_adapter = None
        self.picked = True
        self._sync_labels()

    # --- controls -----------------------------------------------------------------------
    def action_compare(self) -> None:
        box = self.query_one("#compare", Checkbox)
        box.value = not box.value

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        self.query_one("#right").display = event.value
        self._sync_labels()

    def on_select_changed(self, event: Select.Changed) -> None:
        self._sync_labels()

    def _sync_labels(self) -> None:
        adapter = self.query_one("#adapter", Select).value
        compare = self.query_one("#compare", Checkbox).value
        name = "base" if adapter == BASE_ONLY else Path(str(adapter)).name
        self.query_one("#left").border_title = "base" if compare else name
        self.query_one("#right").border_title = name

    def action_pick_adapter(self) -> None:
        self.query_one("#adapter", Select).focus()

    def action_reset(self) -> None:
        self.history = []
        for t in self.query(Transcript):
            t.remove_children()
        self.query_one("#chat-status", Static).update("new conversation")

    def action_stop(self) -> None:
        self.stop_flag = True

    # --- talking ------------------------------------------------------------------------
    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "message":
            self.query_one("#message", Input).focus()
            return
        text = event.value.strip()
        if not text or self.busy:
            return
        try:
            temperature = float(self.query_one("#temperature", Input).value or 0.7)
            if not 0 <= temperature <= 5:
                raise ValueError
        except ValueError:
            self.show_error(ValueError("temperature: expected a number from 0 to 5"),
                            self.query_one("#chat-status", Static))
            return
        event.input.value = ""
        adapter = self.query_one("#adapter", Select).value
        adapter = None if adapter == BASE_ONLY else str(adapter)
        compare = self.query_one("#compare", Checkbox).value and adapter is not None
        system = self.query_one("#system", Input).value.strip()
        messages = ([{"role": "system", "content": system}] if system else []) + \
            self.history + [{"role": "user", "content": text}]
        columns = [("base", self.query_one("#left", Transcript), None),
                   ("tuned", self.query_one("#right", Transcript), adapter)] if compare else \
            [("bot", self.query_one("#left", Transcript), adapter)]
        targets = []
        for who, column, name in columns:
            column.add("you", text, "you")
            targets.append((column.add(who), name))
        self.history.append({"role": "user", "content": text})
        self.busy, self.stop_flag = True, False
        self._answer(messages, adapter, targets, temperature)

    def _engine(self, adapter: str | None):
        """One llama.cpp engine with the base and (if any) the adapter loaded; compare mode
        switches the adapter off and on for each answer."""
        key = adapter
        if self.engine is not None and self.engine_key == key:
            return self.engine
        self._close_engine()
        target = self.core.resolve_chat(Path(adapter) if adapter else None, None)
        self.engine = self.core.open_engine(target)
        self.engine_key = key
        return self.engine

    def _close_engine(self) -> None:
        if self.engine is not None:
            try:
                self.engine.close()
            finally:
                self.engine = None

    @work(thread=True, exclusive=True, exit_on_error=False, group="chat")
    def _answer(self, messages, adapter, targets, temperature: float) -> None:
        status = self.query_one("#chat-status", Static)
        reply = ""
        try:
            self.app.call_from_thread(status.update, "loading the model ...")
            engine = self._engine(adapter)
            for line, name in targets:
                if adapter is not None:
                    engine.activate("adapter" if name else None)
                self.app.call_from_thread(status.update, "answering ... (escape stops)")
                reply = ""
                for piece in engine.chat_stream(messages, temperature=temperature,
                                                max_tokens=256):
                    reply += piece
                    self.app.call_from_thread(Transcript.extend, line, piece)
                    if self.stop_flag:
                        self.app.call_from_thread(Transcript.extend, line, " [stopped]")
                        break
            if adapter is not None:
                engine.activate("adapter")
            self.app.call_from_thread(status.update, "")
        except Exception as exc:  # noqa: BLE001 - shown in the UI, never a crash
            self.app.call_from_thread(self.show_error, exc, status)
        finally:
            self.busy = False
            self.answered += 1
        # the adapter's answer continues the conversation (the last column answered)
        self.history.append({"role": "assistant", "content": reply})

    def on_unmount(self) -> None:
        self._close_engine()


__all__ = ["ChatScreen", "error_text"]
