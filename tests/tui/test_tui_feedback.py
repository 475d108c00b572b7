"""The TUI's chat marks answers (ctrl+g / ctrl+b, or /good and /bad [comment] typed): each
verdict is a KTO record in the runs folder's feedback.jsonl, the file ``train --method kto``
reads. Real llama.cpp on a tiny random base with a random adapter (answers in milliseconds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("textual")

from edge_tune.data.formats import read_records
from edge_tune.tui.app import EdgeTuneApp
from textual.widgets import Input, Static
from tests.helpers.pilot import run, text_of, until


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, default_gguf) -> Path:
    from tests.helpers.tiny_runs import make_tiny_runs

    made = make_tiny_runs(tmp_path_factory.mktemp("tui-feedback"), default_gguf)
    runs = made["lora"].parent / "runs"
    runs.mkdir()
    shutil.move(made["lora"], runs / "lora")
    return runs


def test_chat_marks_answers_as_kto_records(runs_root, monkeypatch):
    monkeypatch.setenv("EDGE_TUNE_THREADS", "1")
    app = EdgeTuneApp(runs_root=runs_root)
    feedback = runs_root / "feedback.jsonl"

    async def send(pilot, text: str) -> None:
        box = pilot.app.screen.query_one("#message", Input)
        box.value = text
        box.focus()
        await pilot.press("enter")

    async def scenario(pilot):
        await pilot.press("f5")
        chat = pilot.app.screen
        await until(pilot, lambda: str(chat.query_one("#adapter").value).endswith("lora"), 30)
        chat.query_one("#temperature", Input).value = "0"
        status = chat.query_one("#chat-status", Static)
        await pilot.press("ctrl+g")  # nothing said yet
        assert "no answer to mark yet" in text_of(status)
        assert not feedback.exists()
        await send(pilot, "first question")
        await until(pilot, lambda: chat.answered == 1, 120, "the answer")
        answer = chat.chat.history[-1]["content"]
        await pilot.press("ctrl+b")
        await until(pilot, lambda: "marked the last answer bad" in text_of(status), 10)
        await send(pilot, "second question")
        await until(pilot, lambda: chat.answered == 2, 120, "the second answer")
        await send(pilot, "/good short and right")
        await until(pilot, lambda: "marked the last answer good" in text_of(status), 10)
        assert str(feedback) in text_of(status).replace("\n", "")
        assert chat.query_one("#message", Input).value == ""
        records = [json.loads(line) for line in feedback.read_text().splitlines()]
        assert [r["label"] for r in records] == [False, True]
        assert records[0]["prompt"][-1] == {"role": "user", "content": "first question"}
        assert records[0]["completion"] == [{"role": "assistant", "content": answer}]
        assert [m["content"] for m in records[1]["prompt"] if m["role"] == "user"] == [
            "first question", "second question"]  # the conversation so far
        assert records[1]["comment"] == "short and right"

    run(scenario, app)
    read = read_records(feedback)
    assert read.kto == (1, 1) and not read.ignored
