"""The Textual TUI (installed as ``edge_tune.tui``). Imports textual only inside functions, so
``import edge_tune.tui`` stays light (``tests/unit/test_import_hygiene.py``)."""

from __future__ import annotations


def run(runs_root: str = "runs") -> None:
    """Open the TUI (``edge-tune`` with no arguments, or ``edge-tune tui``)."""
    from edge_tune.tui.app import EdgeTuneApp

    EdgeTuneApp(runs_root=runs_root).run()
