"""The Textual TUI (installed as ``edge_tune.tui``). Imports textual only inside functions."""
