"""The TUI's replay field (``train --replay N``) and its focus ring in the dialogs, through
Textual's Pilot on the real core: a replay count typed on the Train screen reaches the run
(manifest), a bad one is the field's error in the plan line; under NO_COLOR the export dialog
and the file picker mark their focused widget with a glyph, not a shade."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("textual")
pytest.importorskip("textual_plotext")

from edge_tune.tui.app import EdgeTuneApp, Session  # noqa: E402
from textual.widgets import Input, RichLog, Static  # noqa: E402

from tests.helpers.pilot import log_text, plain, run, screen_lines, type_into, until  # noqa: E402

BAR = "┃"  # the focus ring's glyph (tui/app.py): a heavy bar down the widget's left edge


@pytest.fixture
def replay_cache(tmp_path, monkeypatch) -> Path:
    """The replay answers' cache in this test's folder, seeded: the tiny random model never
    ends an answer (each would run into the token limit and be left out)."""
    from edge_tune import replay

    path = tmp_path / "replay-cache.json"
    path.write_text(json.dumps({p: f"General answer {i}." for i, p in
                                enumerate(replay.replay_prompts()[:3])}))
    monkeypatch.setattr(replay, "_cache_path", lambda *a: path)
    return path


def test_replay_field_reaches_the_run_and_a_bad_value_is_the_fields_error(tiny, tmp_path,
                                                                           replay_cache):
    """Out of range (one more than the shipped general prompts, -1) or not a number: the plan
    line names the field and its range, and ctrl+s refuses to start. 3: a tiny real run mixes in three
    replay records, said in the log and recorded in the manifest as `train --replay 3` is."""
    from edge_tune.replay import max_replay

    most = max_replay()
    data = tmp_path / "narrow.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Ticket {i}: my order {i} is late."},
        {"role": "assistant", "content": json.dumps({"category": "shipping", "id": i})}]}) +
        "\n" for i in range(8)))
    run_dir = tmp_path / "runs" / "replayed"
    app = EdgeTuneApp(runs_root=tmp_path / "runs",
                      session=Session(model=str(tiny), data=str(data)))

    async def scenario(pilot):
        await pilot.press("f3")
        train = pilot.app.screen
        box = train.query_one("#plan", Static)
        field = train.query_one("#replay", Input)
        assert field.value == "0" and "(sft) training only" in str(field.tooltip)
        assert f"at most {most}" in str(field.tooltip)
        for value, said in ((str(most + 1), f"at most {most}"), ("-1", "integer >= 0"),
                            ("many", "not a valid int")):
            await type_into(pilot, "#replay", value)
            await until(pilot, lambda: said in plain(box), 30, f"the error for {value}")
            assert "replay" in plain(box).split("estimate:", 1)[1], plain(box)
        await pilot.press("ctrl+s")
        stats = train.query_one("#stats", Static)
        assert plain(stats).startswith("error:") and "replay" in plain(stats), plain(stats)
        assert not train.running
        for selector, value in (("#replay", "3"), ("#max-steps", "2"), ("#batch-size", "4"),
                                ("#seq-len", "64"), ("#rank", "2"), ("#alpha", "4"),
                                ("#out", str(run_dir))):
            await type_into(pilot, selector, value)
        await until(pilot, lambda: "estimate:" not in plain(box) and "plan" in plain(box), 60,
                    "the plan")
        if train.query("#verify"):
            train.query_one("#verify").value = False
        await pilot.press("ctrl+s")
        await until(pilot, lambda: train.finished_runs == 1, 300, "the run")
        assert plain(stats).startswith("done: 2 steps"), plain(stats)
        assert "replay: 3 general records" in log_text(train.query_one("#log", RichLog))

    run(scenario, app)
    man = json.loads((run_dir / "manifest.json").read_text())
    assert man["hyperparameters"]["replay"] == 3
    assert man["data"]["replay"]["records"] == 3 and man["data"]["examples"] == 8 + 3


# --- the focus ring in the dialogs, without colours -------------------------------------------

def _bar_rows(app, widget) -> list[int]:
    """The rows of ``widget``'s region whose first column shows the focus bar."""
    rows, r = screen_lines(app), widget.region
    return [y for y in range(r.y, r.y + r.height) if rows[y][r.x] == BAR]


async def _focus_is_marked_and_only_there(pilot, widget) -> None:
    """``widget`` (the dialog's focused one) has the bar down its edge and nothing else in the
    dialog has it; blurred, the bar is gone."""
    await pilot.pause()
    assert pilot.app.focused is widget
    r = widget.region
    assert len(_bar_rows(pilot.app, widget)) >= r.height - 2, screen_lines(pilot.app)
    dialog = pilot.app.screen.query_one("Vertical").region
    rows = screen_lines(pilot.app)
    elsewhere = [(x, y) for y in range(dialog.y, dialog.y + dialog.height)
                 for x in range(dialog.x, dialog.x + dialog.width)
                 if rows[y][x] == BAR and not (x == r.x and r.y <= y < r.y + r.height)]
    assert not elsewhere, (elsewhere, rows)
    pilot.app.screen.set_focus(None)
    await pilot.pause()
    assert not _bar_rows(pilot.app, widget), screen_lines(pilot.app)
    widget.focus()
    await pilot.pause()


def _styles_of_line(app, y: int, x0: int, x1: int):
    """The rich styles drawn on screen row ``y`` between columns x0 and x1 (text only)."""
    strips = app.screen._compositor.render_strips()
    styles, x = [], 0
    for seg in strips[y]:
        if seg.text.strip() and x0 <= x < x1 and seg.style is not None:
            styles.append(seg.style)
        x += seg.cell_length
    return styles


@pytest.fixture
def one_run(tmp_path, default_gguf) -> Path:
    """A runs folder with one finished LoRA run (tests/helpers/tiny_runs.py: no training)."""
    from tests.helpers.tiny_runs import make_tiny_runs

    made = make_tiny_runs(tmp_path / "made", default_gguf)
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.move(made["lora"], runs / "lora")
    return runs


def test_export_dialog_and_file_picker_show_their_focus_without_colours(one_run, monkeypatch,
                                                                        tmp_path):
    """NO_COLOR: the export dialog's list and the file picker's tree have the bar down their
    left edge while focused and not when blurred (nothing else in the dialog has it); the
    highlighted choice is underlined and the name under the tree's cursor reverse video, the
    other lines are not."""
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "held-out.jsonl").write_text("{}\n")
    app = EdgeTuneApp(runs_root=one_run)
    assert app.no_color

    async def scenario(pilot):
        await pilot.press("f4")
        await until(pilot, lambda: pilot.app.screen.runs, 30, "the runs table")
        await pilot.press("e")
        await until(pilot, lambda: type(pilot.app.screen).__name__ == "ExportChoice", 30)
        choices = pilot.app.screen.query_one("#choices")
        await _focus_is_marked_and_only_there(pilot, choices)
        r = choices.region  # inside the list's border: its first two options
        first, second = (_styles_of_line(pilot.app, y, r.x + 2, r.right - 2)
                         for y in (r.y + 1, r.y + 2))
        assert first and all(st.underline for st in first), first
        assert second and not any(st.underline for st in second), second
        await pilot.press("escape")
        await until(pilot, lambda: type(pilot.app.screen).__name__ == "AdaptersScreen", 30)

        await pilot.press("ctrl+o")  # the eval data's file picker
        await until(pilot, lambda: type(pilot.app.screen).__name__ == "FilePicker", 30)
        tree = pilot.app.screen.query_one("#tree")
        await until(pilot, lambda: tree.last_line >= 1, 30, "the tree's entries")
        await _focus_is_marked_and_only_there(pilot, tree)
        r = tree.region
        cursor, other = (_styles_of_line(pilot.app, y, r.x + 1, r.right)
                         for y in (r.y, r.y + 1))
        assert any(st.reverse for st in cursor), cursor  # the entry's name (not its icon)
        assert other and not any(st.reverse for st in other), other

    run(scenario, app)
