"""Every TUI screen as an SVG snapshot at 80x24 and 120x40 (pytest-textual-snapshot).

The pictures come from a stand-in core (``tests/helpers/tui_fake.py``) with fixed hardware, data
report, training events, runs and answers: the real ones change with the machine and the
clock. ``pytest --snapshot-update tests/tui/test_tui_snapshots.py`` rewrites them after a
deliberate change; look at the report it writes before committing.
"""

from __future__ import annotations

import pytest

pytest.importorskip("textual")
pytest.importorskip("pytest_textual_snapshot")

from edge_tune.tui.app import EdgeTuneApp, Session
from textual.widgets import Input

from tests.helpers.tui_fake import FakeCore, fake_plan

SIZES = [(80, 24), (120, 40)]


def make_app() -> EdgeTuneApp:
    return EdgeTuneApp(core=FakeCore(), runs_root="runs", planner=fake_plan,
                       session=Session(data="edge_tune/assets/demo.jsonl"))


async def settle(pilot) -> None:
    await pilot.pause(0.8)  # the Train screen plans 0.6 s after the last change
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    for box in pilot.app.screen.query(Input):
        box.cursor_blink = False  # a blinking cursor is on or off depending on timing
    await pilot.pause()


async def hardware(pilot) -> None:
    await settle(pilot)


async def data(pilot) -> None:
    await pilot.press("f2")
    pilot.app.screen.query_one("#data-path").focus()
    await pilot.press("end", "ctrl+u", *"edge_tune/assets/demo.jsonl", "enter")
    await settle(pilot)


async def train(pilot) -> None:
    await pilot.press("f3")
    await settle(pilot)
    await pilot.press("ctrl+s")
    await settle(pilot)
    pilot.app.clear_notifications()
    await pilot.pause()


async def adapters(pilot) -> None:
    await pilot.press("f4")
    await settle(pilot)


async def chat(pilot) -> None:
    await pilot.press("f5")
    await settle(pilot)
    await pilot.press("ctrl+t")  # compare: base and adapter side by side
    await pilot.press(*"What is the capital of Japan?", "enter")
    await settle(pilot)


SCREENS = {"hardware": hardware, "data": data, "train": train, "adapters": adapters,
           "chat": chat}


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("screen", list(SCREENS))
def test_screen_snapshot(snap_compare, screen, size):
    assert snap_compare(make_app(), terminal_size=size, run_before=SCREENS[screen])
