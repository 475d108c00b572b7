"""The TUI driven by keyboard through Textual's Pilot, on the real core: the doctor report and
a backend override, the default model and the demo data inspected, a real tiny training run
on the CPU (chart points arrive), cancel, resume, verify, export, chat (also compare), delete.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("textual")
pytest.importorskip("textual_plotext")

from edge_tune.tui.app import EdgeTuneApp
from textual.widgets import DataTable, Input, RichLog, Static


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


def log_text(log: RichLog) -> str:
    return "\n".join(line.text for line in log.lines)


def failed(log: RichLog) -> bool:
    return any(line.text.startswith("error:") for line in log.lines)


# --- hardware --------------------------------------------------------------------------------

def test_hardware_shows_the_doctor_report_and_takes_a_backend_override(tmp_path):
    app = EdgeTuneApp(runs_root=tmp_path)

    async def scenario(pilot):
        report = pilot.app.screen.query_one("#report", Static)
        await until(pilot, lambda: "backend" in text_of(report) and "CPU" in text_of(report),
                    what="doctor report")
        assert "auto ->" in text_of(report)
        shot(pilot, "hardware")
        await pilot.press("b")  # focus the backend picker
        names = [b["name"] for b in pilot.app.screen.report["backends"]]
        await pilot.press("enter", *["down"] * (names.index("cpu") + 1), "enter")
        await until(pilot, lambda: app.session.backend == "cpu", 60, "backend override")
        await pilot.press("n")  # next: model & data
        assert app.current_mode == "data"

    run(scenario, app)


# --- model & data -----------------------------------------------------------------------------

def test_data_screen_inspects_the_demo_data_with_the_default_model(tmp_path):
    app = EdgeTuneApp(runs_root=tmp_path)

    async def scenario(pilot):
        await pilot.press("f2")
        await pilot.press("ctrl+l")  # the bundled demo data, inspected at once
        await until(pilot, lambda: app.session.report is not None, 120, "inspection")
        out = text_of(pilot.app.screen.query_one("#out", Static))
        assert "openai" in out and "200" in out  # format, records
        assert "token lengths" in out  # the histogram
        assert "Arr, matey!" in out  # the first example, rendered with the chat template
        # trained characters are highlighted (bold green), the prompt is not
        styles = {seg.text.strip(): seg.style for seg in
                  segments(pilot.app.screen.query_one("#out", Static)) if seg.text.strip()}
        trained = [t for t, st in styles.items() if "Arr, matey!" in t]
        assert trained and styles[trained[0]].bold and styles[trained[0]].color.number == 2  # green
        prompt = [t for t, st in styles.items() if "chemical symbol" in t]
        assert prompt and not (styles[prompt[0]] and styles[prompt[0]].bold)
        assert app.session.model == "default"
        assert app.session.data.endswith("demo.jsonl")
        shot(pilot, "data")

    run(scenario, app, size=(120, 40))


def test_data_screen_lists_bad_records_and_picks_files(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}]}
    data = tmp_path / "data"
    data.mkdir()
    bad = data / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n{not json\n" + json.dumps(good) + "\n"
                   + json.dumps({"messages": "nope"}) + "\n")
    app = EdgeTuneApp(runs_root=tmp_path / "runs")

    async def scenario(pilot):
        await pilot.press("f2")
        await type_into(pilot, "#data-path", str(bad))
        await pilot.press("enter")
        bad_box = pilot.app.screen.query_one("#bad", Static)
        await until(pilot, lambda: "bad records" in text_of(bad_box), 60, "bad records")
        listed = text_of(bad_box)
        assert "line 2:" in listed and "line 4:" in listed, listed
        status = text_of(pilot.app.screen.query_one("#status", Static))
        assert status.startswith("error:") and "bad.jsonl:2" in status
        # the file picker: ctrl+o from the data field opens a tree at the file's directory
        await type_into(pilot, "#data-path", str(data))
        await pilot.press("ctrl+o")
        await until(pilot, lambda: type(pilot.app.screen).__name__ == "FilePicker", 60)
        await pilot.pause(0.5)
        await pilot.press("down", "enter")  # the root node's first child: bad.jsonl
        await until(pilot, lambda: type(pilot.app.screen).__name__ == "DataScreen", 60)
        assert pilot.app.screen.query_one("#data-path", Input).value == str(bad)

    run(scenario, app)


# --- train, cancel, resume, adapters, chat ------------------------------------------------------

@pytest.mark.slow
def test_train_cancel_resume_verify_export_chat_delete(tmp_path):
    runs = tmp_path / "runs"
    app = EdgeTuneApp(runs_root=runs)
    run_dir = runs / "tui-run"

    async def scenario(pilot):
        await pilot.press("f2", "ctrl+l")
        await until(pilot, lambda: app.session.report is not None, 120, "inspection")
        await pilot.press("f3")
        train = pilot.app.screen
        for selector, value in (("#max-steps", "6"), ("#batch-size", "2"), ("#seq-len", "64"),
                                ("#rank", "4"), ("#alpha", "8"), ("#val-split", "0.05"),
                                ("#save-every", "0"), ("#out", str(run_dir))):
            await type_into(pilot, selector, value)
        if train.query("#verify"):
            train.query_one("#verify").value = False  # verified below, on the Adapters screen
        await pilot.press("ctrl+s")
        chart = train.query_one("#chart")
        await until(pilot, lambda: len(chart.points["train"]) >= 2, 900, "chart points")
        await pilot.press("ctrl+k")  # cancel: leaves a checkpoint
        await until(pilot, lambda: not train.running, 60, "cancel")
        stats = text_of(train.query_one("#stats", Static))
        assert "cancelled" in stats, stats
        assert (run_dir / "checkpoint" / "state.json").is_file()
        cut = json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"]
        assert 2 <= cut < 6
        finished = train.finished_runs
        await pilot.press("ctrl+r")  # resume
        await until(pilot, lambda: train.finished_runs > finished, 900, "resumed run")
        stats = text_of(train.query_one("#stats", Static))
        assert stats.startswith("done: 6 steps"), stats
        steps = [s for s, _ in chart.points["train"]]
        assert steps[-1] == 6 and steps == sorted(steps)
        assert chart.points["val"], "validation loss points"
        assert "resumed from the checkpoint" in log_text(train.query_one("#log", RichLog))
        assert (run_dir / "manifest.json").is_file() and not (run_dir / "checkpoint").exists()
        shot(pilot, "train")

        # Adapters: the run with its metrics; verify; export; chat
        await pilot.press("f4")
        adapters = pilot.app.screen
        table = adapters.query_one("#runs", DataTable)
        await until(pilot, lambda: table.row_count == 1, 60, "runs table")
        row = table.get_row_at(0)
        assert row[0] == "tui-run" and row[1] == "done" and row[2] == "6"
        actions = adapters.query_one("#actions", RichLog)
        if hasattr(app.core, "verify"):
            await pilot.press("v")
            await until(pilot, lambda: "verify:" in log_text(actions) or failed(actions), 900,
                        "verify")
            assert "verify: ok" in log_text(actions), log_text(actions)
            assert "adapter effect error" in log_text(actions)
        before = (run_dir / "adapter.gguf").stat().st_mtime_ns
        await pilot.press("e")
        await until(pilot, lambda: type(pilot.app.screen).__name__ == "ExportChoice", 60)
        await pilot.press("down", "enter")  # GGUF LoRA adapter (f16)
        await until(pilot, lambda: "export done" in log_text(actions) or failed(actions), 300,
                    "export")
        assert "export done" in log_text(actions), log_text(actions)
        assert (run_dir / "adapter.gguf").stat().st_mtime_ns != before
        shot(pilot, "adapters")

        await pilot.press("c")  # chat with this adapter
        chat = pilot.app.screen
        assert type(chat).__name__ == "ChatScreen"
        await until(pilot, lambda: chat.query_one("#adapter").value == str(run_dir), 60)
        await type_into(pilot, "#temperature", "0")
        await type_into(pilot, "#message", "What is the capital of Japan?")
        await pilot.press("enter")
        await until(pilot, lambda: chat.answered == 1, 600, "answer")
        left = chat.query_one("#left")
        answer = left.children[-1].text
        assert answer.strip(), "streamed answer"
        status = text_of(chat.query_one("#chat-status", Static))
        assert "error" not in status, status
        await pilot.press("ctrl+t")  # compare: base and adapter side by side
        await type_into(pilot, "#message", "What do bees make?")
        await pilot.press("enter")
        await until(pilot, lambda: chat.answered == 2, 600, "compare answers")
        base_answer = chat.query_one("#left").children[-1].text
        tuned_answer = chat.query_one("#right").children[-1].text
        assert base_answer.strip() and tuned_answer.strip()
        shot(pilot, "chat")

        # delete, with a confirmation
        await pilot.press("f4")
        await pilot.press("d")
        await until(pilot, lambda: type(pilot.app.screen).__name__ == "ConfirmScreen", 60)
        await pilot.press("n")
        assert run_dir.is_dir()
        await pilot.press("d", "y")
        await until(pilot, lambda: not run_dir.exists(), 60, "delete")
        assert pilot.app.screen.query_one("#runs", DataTable).row_count == 0

    run(scenario, app)


def test_errors_are_shown_not_raised(tmp_path):
    app = EdgeTuneApp(runs_root=tmp_path / "runs")

    async def scenario(pilot):
        await pilot.press("f3")
        await type_into(pilot, "#lr", "fast")
        await pilot.press("ctrl+s")  # no data chosen and a bad learning rate: one message
        stats = text_of(pilot.app.screen.query_one("#stats", Static))
        assert stats.startswith("error:"), stats
        assert not pilot.app.screen.running
        await pilot.press("ctrl+r")  # nothing to resume
        stats = text_of(pilot.app.screen.query_one("#stats", Static))
        assert "nothing to resume" in stats
        await pilot.press("f4", "v", "e", "d")  # no runs: warnings, no crash
        await pilot.press("f5")
        await type_into(pilot, "#temperature", "hot")
        await type_into(pilot, "#message", "hi")
        await pilot.press("enter")
        assert "temperature" in text_of(pilot.app.screen.query_one("#chat-status", Static))

    run(scenario, app)


# --- the entry point -----------------------------------------------------------------------------

def test_edge_tune_without_arguments_opens_the_tui_in_a_terminal(tmp_path):
    """A real pseudo-terminal: the app draws its screens, then ctrl+q quits with code 0."""
    import pty
    import select
    import subprocess
    import sys

    leader, follower = pty.openpty()
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="80", LINES="24")
    proc = subprocess.Popen([sys.executable, "-m", "edge_tune"], stdin=follower,
                            stdout=follower, stderr=follower, cwd=tmp_path, env=env,
                            close_fds=True)
    os.close(follower)
    seen = b""
    try:
        end = time.monotonic() + 60
        while b"Hardware" not in seen and time.monotonic() < end:
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 65536)
        assert b"Hardware" in seen and b"Model & data" in seen, seen[-500:]
        os.write(leader, b"\x11")  # ctrl+q
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)


def test_edge_tune_without_a_terminal_or_textual_says_so_in_one_line():
    import subprocess
    import sys

    from tests.conftest import assert_one_line_error, run_cli

    assert_one_line_error(run_cli(), "interactive terminal", "edge-tune --help")
    code = ("import sys; sys.modules['textual'] = None; sys.argv = ['edge-tune', 'tui']\n"
            "from edge_tune.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env=dict(os.environ, COLUMNS="200", NO_COLOR="1"))
    assert_one_line_error(proc, "pip install 'edge-tune[tui]'")
