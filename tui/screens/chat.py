"""Chat: streamed answers from the base model plus an adapter (llama.cpp), a compare mode that
shows the base's and the adapter's answers side by side, a system prompt and a temperature.
The conversation itself is :class:`edge_tune.chat_session.ChatSession` (as in ``edge-tune
chat``); this screen renders its events."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ClassVar

from edge_tune.chat_session import Answer, ChatSession, Token, command_of, verdict_of
from edge_tune.tui.widgets import BaseScreen, error_text
from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Checkbox, Input, Label, Select, Static

BASE_ONLY = "__base__"


def carried(old: list, new: list, empty):
    """What each of the ``new`` sides continues from, given the ``old`` sides as
    ``[(adapter, what it said)]``: the old side with the same adapter; a lone new side (an
    adapter switch) the last old side's; any other side (compare's base, turned on mid-chat)
    ``empty()``: it never took part, so the adapter's turns are not its own."""
    by_adapter = {adapter: said for adapter, said in old}
    return [by_adapter[adapter] if adapter in by_adapter
            else old[-1][1] if len(new) == 1 and old else empty() for adapter in new]


class Transcript(VerticalScroll):
    """One column of the conversation; the last answer grows as tokens stream in."""

    DEFAULT_CSS = """
    Transcript { width: 1fr; border: round $panel; padding: 0 1; }
    Transcript > .you { color: $accent; margin-top: 1; }
    """

    def add(self, who: str, text: str = "", css: str = "") -> Static:
        line = Static(Text.assemble((f"{who}> ", "bold"), text), classes=css)
        line.who, line.text, line.thought = who, text, ""
        self.mount(line)
        self.scroll_end(animate=False)
        return line

    def said(self) -> list[tuple[str, str, str]]:
        """The lines shown, as (who, text, css class) to :meth:`add` again."""
        return [(line.who, line.text, " ".join(line.classes)) for line in self.children
                if hasattr(line, "who")]

    @staticmethod
    def extend(line: Static, piece: str, thinking: bool = False) -> None:
        """Add ``piece`` to the answer on ``line`` (``thinking``: to a reasoning model's
        thinking, shown dimmed before the answer)."""
        if thinking:
            line.thought += piece
        else:
            line.text += piece
        thought = (line.thought.strip() + ("\n" if line.text else ""), "dim italic") \
            if line.thought.strip() else ""
        line.update(Text.assemble((f"{line.who}> ", "bold"), thought, line.text))


class ChatScreen(BaseScreen):
    SCREEN_NAME = "chat"
    BINDINGS: ClassVar[list] = [Binding("ctrl+t", "compare", "Compare"),
                Binding("ctrl+a", "pick_adapter", "Adapter", priority=True),
                Binding("ctrl+l", "reset", "New chat"),
                Binding("ctrl+g", "mark(True)", "Good answer", show=False, priority=True),
                Binding("ctrl+b", "mark(False)", "Bad answer", show=False, priority=True),
                Binding("escape", "stop", "Stop")]
    DEFAULT_CSS = """
    ChatScreen .row { height: 1; margin: 0 1; }
    #adapter { width: 1fr; }
    #temperature { width: 6; }
    #system { width: 1fr; }
    #columns { height: 1fr; }
    #chat-status { height: auto; padding: 0 1; color: $text-muted; }  /* errors wrap */
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
        self.shown: list = [None]  # the adapters the columns show, left to right

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
        self._regroup()

    def on_select_changed(self, event: Select.Changed) -> None:
        self._sync_labels()
        self._regroup()

    def sides(self) -> list[tuple[str, str | None]]:
        """Who answers the next message, (label, engine adapter name or None for the base):
        one side, or base and tuned in compare mode (which needs an adapter)."""
        adapter = self.query_one("#adapter", Select).value
        name = None if adapter == BASE_ONLY else "adapter"  # the adapter's name in the engine
        if self.query_one("#compare", Checkbox).value and name is not None:
            return [("base", None), ("tuned", name)]
        return [("bot", name)]

    def _regroup(self) -> None:
        """Follow a change of sides (compare on/off, another adapter) in the columns and the
        conversation alike (:func:`carried`): turning compare on mid-chat moves the adapter's
        conversation to the right column and starts the base from an empty history. While an
        answer streams this waits for its end (the worker writes into the lines shown)."""
        if self.busy:
            return
        sides = self.sides()
        adapters = [adapter for _, adapter in sides]
        if adapters != self.shown:
            columns = [self.query_one("#left", Transcript), self.query_one("#right", Transcript)]
            lines = carried(list(zip(self.shown, [c.said() for c in columns])), adapters, list)
            for column in columns:
                column.remove_children()
            for column, said in zip(columns, lines):
                for who, text, css in said:
                    column.add(who, text, css)
            self.shown = adapters
        if self.chat is not None and self.chat.side_names != sides:
            self.chat = self._continued(self.chat.engine, sides)

    def _continued(self, engine, sides) -> ChatSession:
        """A session with ``sides`` on ``engine``, each side continuing the conversation
        :func:`carried` gives it from the current one."""
        chat = ChatSession(engine, sides, max_tokens=256)
        if self.chat is not None:
            old = [(side.adapter, side.history) for side in self.chat.sides]
            for side, history in zip(chat.sides, carried(old, [a for _, a in sides], list)):
                side.history = [dict(m) for m in history]
            chat.system, chat.temperature = self.chat.system, self.chat.temperature
        return chat

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

    def feedback_path(self) -> Path:
        """Where marked answers go: KTO records beside the runs (``train --method kto``)."""
        return Path(self.app.runs_root) / "feedback.jsonl"

    def action_mark(self, label: bool, comment: str | None = None) -> None:
        """Mark the last answer good or bad (ctrl+g / ctrl+b, or /good and /bad [comment]
        typed): its KTO record appended to :meth:`feedback_path`; in compare mode the
        tuned side's answer."""
        status = self.query_one("#chat-status", Static)
        if self.busy or self.chat is None:
            status.update("no answer to mark yet: ask something first")
            return
        path = self.feedback_path()
        try:
            self.chat.judge(label, path, comment)
        except Exception as exc:  # noqa: BLE001 - shown in the UI, never a crash
            self.show_error(exc, status)
            return
        status.update(f"marked the last answer {'good' if label else 'bad'}: {path} "
                      "(train --method kto reads it)")

    # --- talking ------------------------------------------------------------------------
    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "message":
            self.query_one("#message", Input).focus()
            return
        text = event.value.strip()
        if not text or self.busy:
            return
        verdict = verdict_of(text)
        if verdict is not None:
            event.input.value = ""
            self.action_mark(*verdict)
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
        system = self.query_one("#system", Input).value.strip() or None
        self._regroup()
        sides = self.sides()
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
        """The conversation, continued on ``engine`` with ``sides`` (a new adapter keeps what
        was said; compare's base side starts empty: :func:`carried`)."""
        if self.chat is None or self.chat.engine is not engine or \
                self.chat.side_names != sides:
            self.chat = self._continued(engine, sides)
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
                    self.app.call_from_thread(Transcript.extend, lines[event.side], event.text,
                                              event.thinking)
                elif isinstance(event, Answer) and event.stopped:
                    self.app.call_from_thread(Transcript.extend, lines[event.side], " [stopped]")
            self.app.call_from_thread(status.update, "")
        except Exception as exc:  # noqa: BLE001 - shown in the UI, never a crash
            self.app.call_from_thread(self.show_error, exc, status)
        finally:
            self.busy = False
            with contextlib.suppress(RuntimeError):  # the app closing: nothing to regroup
                self.app.call_from_thread(self._regroup)  # a switch made while answering
            self.answered += 1

    def on_unmount(self) -> None:
        self._close_engine()


__all__ = ["ChatScreen", "error_text"]
