"""A core error that names a setting is shown on the train form's field of that setting (the
message spells it as the command line does), and the mark goes when the error does."""

from __future__ import annotations

import pytest

pytest.importorskip("textual")
pytest.importorskip("textual_plotext")

from edge_tune.tui.app import EdgeTuneApp
from textual.widgets import Input, Static
from tests.helpers.pilot import run, text_of, type_into


def test_a_bad_value_marks_its_field_until_the_error_is_another(tmp_path):
    app = EdgeTuneApp(runs_root=tmp_path / "runs")

    async def scenario(pilot):
        await pilot.press("f3")
        train = pilot.app.screen
        lr, stats = train.query_one("#lr", Input), train.query_one("#stats", Static)
        await type_into(pilot, "#lr", "fast")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert text_of(stats).startswith("error: --lr: 'fast' is not a valid float")
        assert lr.has_class("-invalid")
        assert not any(box.has_class("-invalid") for box in train.query(Input) if box is not lr)
        await pilot.press("tab")  # leaving the field keeps the mark (no validator clears it)
        assert lr.has_class("-invalid")
        await type_into(pilot, "#lr", "0.001")
        await pilot.press("ctrl+s")  # now the error is another one: no data, no setting
        await pilot.pause()
        assert "no training data" in text_of(stats) and not lr.has_class("-invalid")

    run(scenario, app)
