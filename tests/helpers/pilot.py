"""Driving the real app with Textual's Pilot: run a scenario, wait for a condition, read
what widgets and the screen show."""

from __future__ import annotations

import asyncio
import io
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # textual is imported by the tests that need it, after importorskip
    from textual.widgets import RichLog, Static

    from edge_tune.tui.app import EdgeTuneApp


def run(scenario, app: EdgeTuneApp, size=(80, 24)):
    async def main():
        async with app.run_test(size=size) as pilot:
            await scenario(pilot)

    asyncio.run(main())


async def until(pilot, condition, timeout: float = 60, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await pilot.pause(0.2)


def text_of(widget: Static) -> str:
    """What a Static shows, as plain text."""
    from rich.console import Console

    console = Console(width=200, record=True, file=io.StringIO())
    console.print(widget.content if hasattr(widget, "content") else widget.renderable)
    return console.export_text()


def segments(widget: Static):
    from rich.console import Console

    console = Console(width=200, force_terminal=True, color_system="truecolor",
                      file=io.StringIO())
    return list(console.render(widget.content))


async def type_into(pilot, selector: str, text: str) -> None:
    from textual.widgets import Input

    box = pilot.app.screen.query_one(selector, Input)
    box.focus()
    await pilot.press("end", "ctrl+u", *list(text))


def shot(pilot, name: str) -> None:
    """With EDGE_TUNE_TUI_SCREENSHOTS=DIR, save the screen as DIR/NAME.svg (the README's
    pictures come from these real runs)."""
    where = os.environ.get("EDGE_TUNE_TUI_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        pilot.app.save_screenshot(f"{name}.svg", path=where)


def screen_lines(app) -> list[str]:
    """The screen as plain characters, no colours or styles: what a terminal with none shows."""
    from rich.console import Console

    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), record=True,
                      force_terminal=True, legacy_windows=False)
    console.print(app.screen._compositor.render_update(
        full=True, screen_stack=app._background_screens))
    return console.export_text().splitlines()


def shown_whole(app, widget, message: str) -> bool:
    """Whether all of ``message`` is on the screen inside ``widget``'s region (wrapped or
    folded over any number of rows, not cut)."""
    r = widget.region
    rows = screen_lines(app)[r.y:r.y + r.height]
    seen = "".join("".join(row[r.x:r.x + r.width].split()) for row in rows)
    return "".join(message.split()) in seen


def plain(widget: Static) -> str:
    return text_of(widget).strip()


def log_text(log: RichLog) -> str:
    return "\n".join(line.text for line in log.lines)


def failed(log: RichLog) -> bool:
    return any(line.text.startswith("error:") for line in log.lines)
