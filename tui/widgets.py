"""Widgets shared by the screens: the navigation bar, the base screen, report rendering, the
loss chart, a confirmation dialog and a file picker. Rendering only: no edge-tune logic."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar

from rich.console import Console
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Checkbox, DirectoryTree, Footer, Input, Label, Static
from textual_plotext import PlotextPlot

from edge_tune.errors import EdgeTuneError
from edge_tune.tui.core import Core

SCREENS = [("f1", "hardware", "Hardware"), ("f2", "data", "Model & data"),
           ("f3", "train", "Train"), ("f4", "adapters", "Adapters"), ("f5", "chat", "Chat")]


def error_text(exc: BaseException) -> str:
    """A readable one-line message: the core's own for EdgeTuneError, else type and text."""
    if isinstance(exc, EdgeTuneError):
        return str(exc)
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class render_with:
    """One of the CLI's rich renderers (``render_doctor``, ``render_inspect``) as a renderable
    for a Static, drawn at whatever width the widget has: the TUI shows what the CLI prints."""

    def __init__(self, render: Callable[[dict, Console], None], report: dict) -> None:
        self.render, self.report = render, report

    def __rich_console__(self, console, options):
        buf = io.StringIO()
        inner = Console(file=buf, width=max(40, options.max_width), force_terminal=True,
                        color_system="truecolor", legacy_windows=False)
        self.render(self.report, inner)
        yield Text.from_ansi(buf.getvalue().rstrip("\n"), no_wrap=True, overflow="crop")


class NavBar(Static):
    """The five screens with their keys; the current one highlighted."""

    DEFAULT_CSS = """
    NavBar { height: 1; background: $panel; color: $text-muted; }
    """

    def __init__(self, current: str) -> None:
        text = Text(" edge-tune ", style="bold")
        for key, name, title in SCREENS:
            text.append("│")
            text.append(f" {key.upper()} {title} ", style="bold reverse" if name == current
                        else "")
        super().__init__(text)


class BaseScreen(Screen):
    """A screen of the app: the navigation bar on top, the footer with its keys at the bottom."""

    SCREEN_NAME = ""

    def compose(self) -> ComposeResult:
        yield NavBar(self.SCREEN_NAME)
        yield from self.body()
        yield Footer()

    def body(self) -> Iterable:
        return []

    @property
    def core(self) -> Core:
        return self.app.core

    @property
    def session(self):
        return self.app.session

    def on_key(self, event) -> None:
        """Text typed while a checkbox has the focus goes to the next text field instead of
        vanishing: a checkbox takes only space and enter, so "You are a pirate" typed into
        one (focus tabbed one field short) lost its letters and toggled it at each space.
        The first letter moves the focus, with a note saying where the typing went."""
        focused = self.focused
        if not isinstance(focused, Checkbox) or not event.is_printable or \
                event.character in (None, " "):
            return
        chain = self.focus_chain
        if focused not in chain:
            return
        at = chain.index(focused)
        target = next((w for w in chain[at + 1:] + chain[:at]
                       if isinstance(w, Input) and not w.disabled), None)
        if target is None:
            return
        event.stop()
        event.prevent_default()
        # Else its Focus event selects the letter and the next key replaces it; restored in
        # on_descendant_focus, which comes after that event.
        self._select_on_focus = (target, target.select_on_focus)
        target.select_on_focus = False
        target.focus()
        target.insert_text_at_cursor(event.character)
        name = str(focused.label).strip() or "the checkbox"
        where = target.placeholder or target.id or "the next field"
        self.notify(f"'{name}' is a checkbox (space toggles it): typing goes to {where}",
                    timeout=4)

    def on_descendant_focus(self, event) -> None:
        kept = getattr(self, "_select_on_focus", None)
        if kept is not None and event.widget is kept[0]:
            kept[0].select_on_focus = kept[1]
            self._select_on_focus = None

    def show_error(self, exc: BaseException, where: Static | None = None) -> None:
        message = error_text(exc)
        self.notify(message, title="error", severity="error", timeout=10)
        if where is not None:
            where.update(Text(f"error: {message}", style="bold red"))


class LossChart(PlotextPlot):
    """Training and validation loss against the step, drawn with braille dots (plotext)."""

    DEFAULT_CSS = "LossChart { min-height: 6; }"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.points: dict[str, list[tuple[int, float]]] = {"train": [], "val": []}
        self.total: int | None = None

    def on_mount(self) -> None:
        self.replot()

    def clear_points(self) -> None:
        self.points = {"train": [], "val": []}
        self.replot()

    def add(self, split: str, step: int, loss: float, total: int | None = None) -> None:
        self.points.setdefault(split, []).append((step, loss))
        self.total = total or self.total
        self.replot()

    def replot(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("loss")
        plt.xlabel("step")
        for split, color in (("train", "cyan"), ("val", "orange")):
            pts = self.points.get(split) or []
            if pts:
                plt.plot([p[0] for p in pts], [p[1] for p in pts], label=split,
                         marker="braille", color=color)
        if self.total:
            plt.xlim(0, self.total)
        self.refresh()


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; y/enter = yes, n/escape = no."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 60; height: auto; border: thick $error; padding: 1 2;
                               background: $surface; }
    """
    BINDINGS: ClassVar[list] = [Binding("y", "answer(True)", "Yes"), Binding("enter", "answer(True)", "Yes",
                                                                show=False),
                Binding("n", "answer(False)", "No"), Binding("escape", "answer(False)", "No",
                                                             show=False)]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question)
            yield Label("[b]y[/b] yes   [b]n[/b] no")
        yield Footer()

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class _FilteredTree(DirectoryTree):
    def __init__(self, path: Path, suffixes: tuple[str, ...], **kw) -> None:
        super().__init__(path, **kw)
        self.suffixes = suffixes

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".") and
                (p.is_dir() or not self.suffixes or p.suffix.lower() in self.suffixes)]


class FilePicker(ModalScreen["Path | None"]):
    """Pick a file (or, with ``dirs``, a directory): arrows move, enter opens/picks,
    u goes up a directory, escape cancels."""

    DEFAULT_CSS = """
    FilePicker { align: center middle; }
    FilePicker > Vertical { width: 90%; height: 90%; border: thick $accent; background: $surface; }
    FilePicker Label { padding: 0 1; }
    """
    BINDINGS: ClassVar[list] = [Binding("escape", "dismiss_none", "Cancel"), Binding("u", "up", "Up a dir"),
                Binding("s", "pick_dir", "Pick dir", show=False)]

    def __init__(self, start: Path, suffixes: tuple[str, ...] = (), dirs: bool = False,
                 title: str = "pick a file") -> None:
        super().__init__()
        self.start = start if start.is_dir() else start.parent
        self.suffixes, self.dirs, self.title_text = suffixes, dirs, title

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"[b]{self.title_text}[/b] - {self.start.resolve()}", id="where")
            yield _FilteredTree(self.start, self.suffixes, id="tree")
            if self.dirs:
                yield Label("[b]s[/b] picks the highlighted directory")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#tree").focus()

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        event.stop()
        self.dismiss(Path(event.path))

    def action_dismiss_none(self) -> None:
        self.dismiss(None)

    def action_up(self) -> None:
        tree = self.query_one("#tree", _FilteredTree)
        parent = Path(tree.path).resolve().parent
        tree.path = parent
        self.query_one("#where", Label).update(f"[b]{self.title_text}[/b] - {parent}")

    def action_pick_dir(self) -> None:
        if not self.dirs:
            return
        node = self.query_one("#tree", _FilteredTree).cursor_node
        if node is not None and node.data is not None and Path(node.data.path).is_dir():
            self.dismiss(Path(node.data.path))
