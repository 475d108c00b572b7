"""Chat: streamed answers from the base model plus an adapter (llama.cpp), a compare mode that
shows the base's and the adapter's answers side by side, a system prompt and a temperature.
The conversation itself is :class:`edge_tune.chat_session.ChatSession` (as in ``edge-tune
chat``); this screen renders its events."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from edge_tune.chat_session import Answer, ChatSession, Token, command_of
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
        self.chat: ChatSession | None = None  # the conversation; kept across adapter changes
        self.engine = None
        self.engine_key = None
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
        if self.chat is not None:
            self.chat.reset()
        for t in self.query(Transcript):
            t.remove_children()
        self.query_one("#chat-status", Static).update("new conversation")

    def action_stop(self) -> None:
        if self.chat is not None:
            self.chat.stop()

    # --- talking ------------------------------------------------------------------------
    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "message":
            self.query_one("#message", Input).focus()
            return
        text = event.value.strip()
        if not text or self.busy:
            return
        if command_of(text) is not None:  # /reset (and /exit: a new conversation too)
            event.input.value = ""
            self.action_reset()
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
        system = self.query_one("#system", Input).value.strip() or None
        name = "adapter" if adapter else None  # the adapter's name in the engine
        sides = [("base", None), ("tuned", name)] if compare else [("bot", name)]
        columns = [self.query_one("#left", Transcript), self.query_one("#right", Transcript)]
        lines = []
        for (who, _), column in zip(sides, columns):
            column.add("you", text, "you")
            lines.append(column.add(who))
        self.busy = True
        self._answer(text, adapter, sides, lines, system, temperature)

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

    def _session(self, engine, sides) -> ChatSession:
        """The conversation, continued on ``engine`` with ``sides`` (a new adapter or the
        compare switch keeps what was said)."""
        if self.chat is None or self.chat.engine is not engine or \
                self.chat.side_names != sides:
            self.chat = ChatSession(engine, sides, max_tokens=256,
                                    history=self.chat.history if self.chat else ())
        return self.chat

    @work(thread=True, exclusive=True, exit_on_error=False, group="chat")
    def _answer(self, text: str, adapter, sides, lines, system, temperature: float) -> None:
        status = self.query_one("#chat-status", Static)
        try:
            self.app.call_from_thread(status.update, "loading the model ...")
            chat = self._session(self._engine(adapter), sides)
            chat.system, chat.temperature = system, temperature
            plain = chat.plain_sides()
            self.app.call_from_thread(status.update, "answering ... (escape stops)" + (
                f"; {', '.join(plain)}: no chat template, a plain text completion"
                if plain else ""))
            for event in chat.ask(text):
                if isinstance(event, Token):
                    self.app.call_from_thread(Transcript.extend, lines[event.side], event.text)
                elif isinstance(event, Answer) and event.stopped:
                    self.app.call_from_thread(Transcript.extend, lines[event.side], " [stopped]")
            self.app.call_from_thread(status.update, "")
        except Exception as exc:  # noqa: BLE001 - shown in the UI, never a crash
            self.app.call_from_thread(self.show_error, exc, status)
        finally:
            self.busy = False
            self.answered += 1

    def on_unmount(self) -> None:
        self._close_engine()


__all__ = ["ChatScreen", "error_text"]
