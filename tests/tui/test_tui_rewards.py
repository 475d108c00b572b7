"""The Train screen shows a preference run's reward margin and accuracy (DPO/ORPO) beside the
loss, for training and validation, and an SFT run's line as before. Textual's Pilot with the
snapshot tests' fixed core (no training: the events are fed to the screen as the core sends
them)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("textual")
pytest.importorskip("textual_plotext")

from edge_tune.events import Metric  # noqa: E402
from edge_tune.tui.app import EdgeTuneApp, Session  # noqa: E402
from textual.widgets import RichLog, Static  # noqa: E402

from tests.helpers.tui_fake import FakeCore, fake_plan  # noqa: E402


def _train_screen_after(events, size=(120, 40)) -> tuple[str, list[str]]:
    """(the stats line, the log's lines) of the Train screen after ``events``."""
    got: dict = {}

    async def main():
        app = EdgeTuneApp(core=FakeCore(), runs_root="runs", planner=fake_plan,
                          session=Session(data="edge_tune/assets/pref_demo.jsonl"))
        async with app.run_test(size=size) as pilot:
            await pilot.press("f3")
            await pilot.pause()
            for event in events:
                app.screen.on_core_event(event)
            await pilot.pause()
            got["stats"] = str(app.screen.query_one("#stats", Static).render())
            got["log"] = [strip.text for strip in app.screen.query_one("#log", RichLog).lines]

    asyncio.run(main())
    return got["stats"], got["log"]


def test_train_screen_shows_reward_margin_and_accuracy_of_a_preference_run():
    stats, log = _train_screen_after([
        Metric(step=1, total_steps=6, loss=0.693, tokens_per_second=150.0, learning_rate=2e-3,
               reward_margin=0.0, reward_accuracy=0.0),
        Metric(step=2, total_steps=6, loss=0.648, tokens_per_second=150.0, learning_rate=2e-3,
               reward_margin=0.092, reward_accuracy=1.0),
        Metric(step=2, total_steps=6, loss=0.5675, split="val", reward_margin=0.27,
               reward_accuracy=0.75)])
    assert "loss 0.648 (margin +0.09, acc 100%)" in stats, stats
    assert "val 0.568 (margin +0.27, acc 75%)" in stats, stats
    assert "validation at step 2: loss 0.568 (margin +0.27, acc 75%)" in log, log


def test_train_screen_line_of_an_sft_run_has_no_rewards():
    stats, log = _train_screen_after([
        Metric(step=3, total_steps=6, loss=1.25, tokens_per_second=251.0, learning_rate=1e-3),
        Metric(step=3, total_steps=6, loss=1.5, split="val")])
    assert stats.startswith("step 3/6  loss 1.250  val 1.500  251 tok/s"), stats
    assert "margin" not in stats and not any("validation at" in line for line in log)
