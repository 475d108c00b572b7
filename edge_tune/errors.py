"""The one error type users see.

Anything the user can fix (a missing file, a bad record, an adapter that does not fit its base)
is raised as :class:`EdgeTuneError` with a single line that names the file/field and what was
expected. Front ends print the line and exit with ``exit_code``; they never show a traceback
for it. Any other exception is a bug in edge-tune and keeps its traceback.
"""

from __future__ import annotations


class EdgeTuneError(Exception):
    """A user-facing failure: one line of text and a process exit code."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        # Keep it to one line: front ends print it as-is after "error: ".
        super().__init__(" ".join(str(message).split("\n")).strip())
        self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self)
