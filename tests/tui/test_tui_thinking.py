"""The TUI chat's transcript shows a reasoning model's thinking dimmed, before the answer,
as the two stream in (ChatSession's ``Token.thinking`` pieces: tests/integration/
test_server_reasoning.py), driven with Textual's Pilot."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("textual")

from textual.app import App

from edge_tune.tui.screens.chat import Transcript
from tests.helpers.pilot import text_of


class _One(App):
    def compose(self):
        yield Transcript()


def test_thinking_is_dimmed_before_the_answer():
    async def main():
        async with _One().run_test(size=(60, 12)) as pilot:
            transcript = pilot.app.query_one(Transcript)
            line = transcript.add("bot")
            Transcript.extend(line, "Two and two", thinking=True)
            Transcript.extend(line, " make four.", thinking=True)
            await pilot.pause()
            assert text_of(line).strip() == "bot> Two and two make four."
            Transcript.extend(line, "Four.")
            await pilot.pause()
            assert text_of(line).splitlines()[:2] == ["bot> Two and two make four.", "Four."]
            text = line.content
            dim = {text.plain[s.start:s.end] for s in text.spans if "dim" in str(s.style)}
            assert dim == {"Two and two make four.\n"} and line.text == "Four."

    asyncio.run(main())
