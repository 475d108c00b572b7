"""The TUI driven by keyboard through Textual's Pilot, on the real core: the doctor report and
a backend override, the default model and the demo data inspected, a real tiny training run
on the CPU (chart points arrive), cancel, resume, verify, export, chat (also compare), delete.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("textual")
pytest.importorskip("textual_plotext")

from edge_tune.tui.app import EdgeTuneApp
from textual.widgets import DataTable, Input, RichLog, Static
from tests.helpers.pilot import (
    failed, log_text, plain, run, screen_lines, segments, shot, shown_whole, text_of, type_into, until,
)


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


# --- no dead ends (issue 26) ------------------------------------------------------------------

@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_plan_line_and_field_errors_are_shown_whole_with_a_long_gguf_path(tmp_path, tiny,
                                                                          demo_jsonl, size):
    """A GGUF deep in a directory tree as the model: the Train screen's plan line, a field's
    error in it, the error of a refused start and the Model & data screen's error all wrap
    over the full width; each message is on the screen whole at 80x24 and 120x40. The real
    core checks the fields; the estimate is a stand-in with the longest form of the real
    planner's line (one with changed settings), as the real one takes ~5 s a plan here."""
    from edge_tune.tui.app import Session

    def planner(cfg) -> dict:
        return {"summary": "plan: peak ~7.91 GiB of 6.2 GiB budget (cpu, bf16); ~41.3s/step, "
                           "~69 min for 100 steps; changed: batch size 8 -> 2 with gradient "
                           "accumulation 4 (same effective batch); gradient checkpointing on"}

    deep = tmp_path.joinpath("models", "a-very-long-directory-name-people-have", "gemma-3",
                             "270m-it", "quantized-by-someone")
    deep.mkdir(parents=True)
    model = deep / "tiny-model-with-a-long-name.Q4_K_M.gguf"
    model.symlink_to(tiny)
    app = EdgeTuneApp(runs_root=tmp_path / "runs", planner=planner,
                      session=Session(model=str(model), data=str(demo_jsonl)))

    async def scenario(pilot):
        await pilot.press("f3")
        box = pilot.app.screen.query_one("#plan", Static)
        await until(pilot, lambda: "plan" in plain(box).splitlines()[-1], 120, "the plan")
        await pilot.pause()
        assert shown_whole(pilot.app, box, plain(box)), (plain(box), screen_lines(pilot.app))
        assert str(model) in plain(box).replace("\n", "")
        await type_into(pilot, "#lr", "fast")
        await until(pilot, lambda: "--lr" in plain(box), 30, "the field's error")
        await pilot.pause()
        assert shown_whole(pilot.app, box, plain(box)), screen_lines(pilot.app)
        await type_into(pilot, "#lr", "0.001")
        await type_into(pilot, "#val-split", "2")  # refused when ctrl+s starts
        await pilot.press("ctrl+s")
        stats = pilot.app.screen.query_one("#stats", Static)
        assert plain(stats).startswith("error:") and not pilot.app.screen.running
        await pilot.pause()
        assert shown_whole(pilot.app, stats, plain(stats)), screen_lines(pilot.app)
        # Model & data: an error naming the long path
        await pilot.press("f2")
        missing = deep / "held-out-and-training-data-for-the-support-email-task.jsonl"
        pilot.app.screen.query_one("#data-path", Input).value = str(missing)  # (typing: slow)
        pilot.app.screen.query_one("#data-path", Input).focus()
        await pilot.press("enter")
        status = pilot.app.screen.query_one("#status", Static)
        await until(pilot, lambda: plain(status).startswith("error:"), 60, "the data error")
        await pilot.pause()
        assert missing.name in plain(status).replace("\n", "")
        assert shown_whole(pilot.app, status, plain(status)), screen_lines(pilot.app)

    run(scenario, app, size=size)


# The eval data field: tests/e2e/test_eval.py::test_tui_eval_takes_held_out_data_from_its_field
# (it shares that module's tiny trained run).


def test_template_hint_names_only_templates_the_model_can_use(tmp_path):
    """A Gemma base GGUF without a chat template: the note suggests gemma2 (its family's own)
    and gemma, never chatml (its vocabulary has no <|im_start|>), and so does the refusal to
    inspect chats without one; the default model has its own. The real core reads the GGUF's
    header and vocabulary."""
    from tests.helpers.tiny_families import family_gguf

    gemma = family_gguf("gemma2", template=False)
    app = EdgeTuneApp(runs_root=tmp_path / "runs")

    async def scenario(pilot):
        await pilot.press("f2")
        note = pilot.app.screen.query_one("#template-note")
        await until(pilot, lambda: "own" in str(note.content), 60, "the default's note")
        assert "smollm2" in str(note.content)
        pilot.app.screen.query_one("#base-kind").value = "gguf"
        await pilot.pause()
        pilot.app.screen.query_one("#base-path", Input).value = str(gemma)
        await until(pilot, lambda: "has none" in str(note.content), 60, "the note")
        said = str(note.content)
        assert "give gemma2" in said and "gemma" in said.split("give gemma2", 1)[1], said
        assert "chatml" not in said and "llama3" not in said, said
        tip = pilot.app.screen.query_one("#chat-template").tooltip
        assert "gemma2, gemma" in tip and "chatml" not in tip
        await pilot.pause()
        assert shown_whole(pilot.app, note, said)
        # inspecting conversations without a template: the refusal names the same ones
        await pilot.press("ctrl+l")  # the demo data (chats)
        status = pilot.app.screen.query_one("#status", Static)
        await until(pilot, lambda: plain(status).startswith("error:"), 60, "the refusal")
        refusal = plain(status)
        assert "fit its vocabulary: gemma2, gemma;" in " ".join(refusal.split()), refusal
        assert "chatml" not in refusal, refusal

    run(scenario, app)


def test_focus_is_visible_without_colours_and_checkbox_typing_is_not_lost(tmp_path,
                                                                          monkeypatch):
    """NO_COLOR (Textual then draws in monochrome; a 16-colour or TERM=dumb terminal loses
    background shades the same way): the focused field has a bar glyph beside it that no
    other field has, on every screen. Text typed while a checkbox has the focus goes to the
    next text field (here the system prompt), with a note, and does not toggle it."""
    from tests.helpers.tui_fake import FakeCore, fake_plan

    from edge_tune.tui.app import Session

    monkeypatch.setenv("NO_COLOR", "1")
    app = EdgeTuneApp(core=FakeCore(), runs_root="runs", planner=fake_plan,
                      session=Session(data="edge_tune/assets/demo.jsonl"))
    assert app.no_color

    async def scenario(pilot):
        for key in ("f1", "f2", "f3", "f4", "f5"):
            await pilot.press(key)
            await pilot.pause()
            seen = []
            while pilot.app.focused is not None and pilot.app.focused not in seen and \
                    len(seen) < 4:  # kinds of field, not every field (a tab: ~0.3 s)
                widget = pilot.app.focused
                seen.append(widget)
                await pilot.pause()
                rows = screen_lines(pilot.app)
                r = widget.region
                assert rows[r.y][r.x] in "┃┏", (key, widget, rows[r.y])
                others = [w for w in pilot.app.screen.focus_chain if w is not widget
                          and w.region.height and rows[w.region.y][w.region.x] in "┃┏"]
                assert not others, (key, widget, others)
                await pilot.press("tab")
            assert len(seen) >= 2, (key, seen)
            if key == "f4":  # the selected run's row: reverse video, not only a shade
                table = pilot.app.screen.query_one("#runs", DataTable)
                row = [seg.style for seg in table.render_line(1) if seg.text.strip()]
                other = [seg.style for seg in table.render_line(2) if seg.text.strip()]
                assert row and all(st.reverse for st in row), row
                assert not any(st.reverse for st in other), other
        # the Chat screen: focus one field short of the system prompt, on "compare"
        chat = pilot.app.screen
        compare, system = chat.query_one("#compare"), chat.query_one("#system", Input)
        compare.focus()
        await pilot.pause()
        was = compare.value
        await pilot.press(*"You are a pirate.")
        assert system.value == "You are a pirate." and compare.value == was
        assert pilot.app.focused is system and system.select_on_focus
        assert any("typing goes to" in n.message for n in pilot.app._notifications)
        await pilot.press("shift+tab", "space")  # space on a checkbox still toggles it
        assert compare.value != was

    run(scenario, app)


@pytest.fixture(scope="module")
def tiny_adapter_runs(tmp_path_factory, default_gguf) -> Path:
    """A runs folder holding one LoRA run (tests/helpers/tiny_runs.py: a random adapter on the tiny
    random base): real llama.cpp answers in milliseconds."""
    import shutil

    from tests.helpers.tiny_runs import make_tiny_runs

    made = make_tiny_runs(tmp_path_factory.mktemp("tui-chat"), default_gguf)
    runs = made["lora"].parent / "runs"
    runs.mkdir()
    shutil.move(made["lora"], runs / "lora")
    return runs


def test_compare_turned_on_mid_chat_starts_the_base_from_an_empty_history(tiny_adapter_runs,
                                                                          monkeypatch):
    """Chat with an adapter, then ctrl+t: the adapter's conversation moves to the right
    (tuned) column and the base answers the next message with no history (it never said
    the adapter's words); compare off again continues the adapter's conversation."""
    # one llama.cpp thread: on a shared machine its threads wait for each other at every op
    monkeypatch.setenv("EDGE_TUNE_THREADS", "1")
    app = EdgeTuneApp(runs_root=tiny_adapter_runs)

    async def send(pilot, text: str) -> None:
        box = pilot.app.screen.query_one("#message", Input)
        box.value = text  # (typed: one key a tick, seconds on a shared machine)
        box.focus()
        await pilot.press("enter")

    async def scenario(pilot):
        await pilot.press("f5")
        chat = pilot.app.screen
        await until(pilot, lambda: str(chat.query_one("#adapter").value).endswith("lora"), 30)
        chat.query_one("#temperature", Input).value = "0"
        await send(pilot, "first question")
        await until(pilot, lambda: chat.answered == 1, 120, "the adapter's answer")
        left, right = chat.query_one("#left"), chat.query_one("#right")
        first = [text for _, text, _ in left.said()]
        assert first[0] == "first question" and len(first) == 2
        await pilot.press("ctrl+t")
        await pilot.pause()
        assert left.said() == [] and [t for _, t, _ in right.said()] == first
        await send(pilot, "second question")
        await until(pilot, lambda: chat.answered == 2, 120, "compare answers")
        base, tuned = chat.chat.sides
        assert [m["content"] for m in base.history][:1] == ["second question"]
        assert len(base.history) == 2  # the base was sent this message only
        assert [m["content"] for m in tuned.history][:3] == first + ["second question"]
        assert [who for who, _, _ in left.said()] == ["you", "base"]
        assert [who for who, _, _ in right.said()] == ["you", "bot", "you", "tuned"]
        await pilot.press("ctrl+t")  # compare off: the adapter's conversation goes on
        await pilot.pause()
        assert [who for who, _, _ in left.said()] == ["you", "bot", "you", "tuned"]
        assert chat.chat.history == tuned.history and len(chat.chat.sides) == 1

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

    from tests.helpers.cli import assert_one_line_error, run_cli

    assert_one_line_error(run_cli(), "interactive terminal", "edge-tune --help")
    code = ("import sys; sys.modules['textual'] = None; sys.argv = ['edge-tune', 'tui']\n"
            "from edge_tune.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env=dict(os.environ, COLUMNS="200", NO_COLOR="1"))
    assert_one_line_error(proc, "pip install 'edge-tune[tui]'")
