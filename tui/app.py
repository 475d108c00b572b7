"""The edge-tune TUI: five screens over :mod:`edge_tune.api` (hardware, model & data, train,
adapters, chat). The app holds the session's choices; screens call the core and render its
events. ``core`` is anything with the functions of :class:`edge_tune.tui.core.Core` (a stand-in
with fixed answers in the snapshot tests)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from edge_tune.config import TrainConfig
from edge_tune.tui.core import Core
from edge_tune.tui.screens.adapters import AdaptersScreen
from edge_tune.tui.screens.chat import ChatScreen
from edge_tune.tui.screens.data import DataScreen
from edge_tune.tui.screens.hardware import HardwareScreen
from edge_tune.tui.screens.train import TrainScreen
from edge_tune.tui.widgets import SCREENS
from textual.app import App
from textual.binding import Binding


@dataclass
class Session:
    """What the person chose so far; each screen reads and updates it."""

    backend: str = "auto"
    model: str = "default"
    data: str = ""
    data_format: str = "auto"
    seq_len: int = 512
    chat_template: str | None = None  # --chat-template: a built-in name or a .jinja file
    report: dict | None = None  # the last data inspection
    run_dir: str | None = None  # the run last trained (or resumed) here
    chat_adapter: str | None = None  # preselected on the Chat screen
    extra: dict = field(default_factory=dict)


class EdgeTuneApp(App):
    TITLE = "edge-tune"
    CSS = """
    Screen { layout: vertical; }
    .row { height: auto; }
    .label { width: 12; padding: 0 1 0 0; color: $text-muted; }
    .hint { color: $text-muted; }
    .status { height: 1; padding: 0 1; background: $boost; }
    Input { width: 1fr; }
    /* The focus ring is a glyph, not a colour: with NO_COLOR, TERM=dumb or a 16-colour
       palette a changed background disappears, a bar beside the field does not. */
    .-textual-compact:focus, DataTable:focus, RichLog:focus, VerticalScroll:focus,
    OptionList:focus, Tree:focus {
        border-left: heavy $accent; }
    Input:focus, Transcript:focus { border: heavy $accent; }
    Input.-textual-compact:focus { border: none; border-left: heavy $accent; }
    /* with NO_COLOR the selected run's row and the file picker's cursor are reverse video,
       the highlighted choice of a list (the export dialog) underlined: else a grey shade at
       best (an OptionList draws its options without reverse, whatever the CSS says) */
    App:nocolor .datatable--cursor, App:nocolor .tree--cursor { text-style: reverse bold; }
    App:nocolor .option-list--option-highlighted { text-style: bold underline; }
    """
    MODES: ClassVar[dict] = {"hardware": HardwareScreen, "data": DataScreen, "train": TrainScreen,
             "adapters": AdaptersScreen, "chat": ChatScreen}
    DEFAULT_MODE = "hardware"
    BINDINGS: ClassVar[list] = [Binding(key, f"switch_mode('{name}')", title, show=False)
                for key, name, title in SCREENS] + [
        Binding("ctrl+q", "quit", "Quit", priority=True)]

    def __init__(self, core: Core | None = None, runs_root: str | Path = "runs",
                 session: Session | None = None,
                 planner: Callable[[TrainConfig], dict] | None = None) -> None:
        super().__init__()
        if core is None:
            from edge_tune import api as core
        self.core: Core = core
        self.runs_root = Path(runs_root)
        self.session = session or Session()
        self._planner = planner

    async def action_quit(self) -> None:
        """Quit; a training run still going is cancelled first (it leaves a checkpoint), so
        no training process outlives the app."""
        import asyncio

        train = next((s for s in self.screen_stack_all() if isinstance(s, TrainScreen)), None)
        if train is not None and train.running:
            train.action_cancel()
            self.notify("stopping the training run: saving a checkpoint ...")
            for _ in range(150):
                if not train.running:
                    break
                await asyncio.sleep(0.2)
        self.exit()

    def screen_stack_all(self) -> list:
        """Every screen of every mode (a mode keeps its screen while another is shown)."""
        stacks = getattr(self, "_screen_stacks", {})
        return [screen for stack in stacks.values() for screen in stack]

    @property
    def planner(self) -> Callable[[TrainConfig], dict]:
        """What the Train screen estimates with (predicted peak memory and time): the core's
        ``plan``, unless the app was given another (tests: the real one takes seconds)."""
        return self._planner if self._planner is not None else self.core.plan
