"""The errors users see, and the one table of process exit codes.

Anything the user can fix (a missing file, a bad record, an adapter that does not fit its base)
is raised as :class:`EdgeTuneError` (or one of its kinds below) with a single line that names
the file/field and what was expected. Front ends print the line and exit with ``exit_code``;
they never show a traceback for it. Any other exception is a bug in edge-tune and keeps its
traceback (the CLI exits :attr:`ExitCode.FAILED`).

Kinds, and what a script calling ``edge-tune`` can do about each exit code:

=================  ===============  ==========================================================
class              exit code        meaning
=================  ===============  ==========================================================
EdgeTuneError      2 BAD_INPUT      bad input in general (the default of every plain raise)
UsageError         2 BAD_INPUT      options that do not fit together, a missing extra
DataError          2 BAD_INPUT      a file or record that is not what was expected
DiskFull           2 BAD_INPUT      not enough free space for what a command will write (said
                                    before any work), or a write that ran out of it (the
                                    line names the path and what was kept)
CheckFailed        1 FAILED         the command ran, its result failed a check (verify out of
                                    tolerance, an empty answer, a training process that died)
NetworkError       3 NETWORK        a download or hub request failed: retry, or work offline
Cancelled          130 CANCELLED    stopped by the user (128 + SIGINT, as shells report ^C)
=================  ===============  ==========================================================
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of ``edge-tune``; :data:`EXIT_CODES` maps each error kind to one."""

    OK = 0
    FAILED = 1
    BAD_INPUT = 2
    NETWORK = 3
    CANCELLED = 130


class EdgeTuneError(Exception):
    """A user-facing failure: one line of text; its kind decides the exit code."""

    def __init__(self, message: str) -> None:
        # Keep it to one line: front ends print it as-is after "error: ".
        super().__init__(" ".join(str(message).split("\n")).strip())

    @property
    def message(self) -> str:
        return str(self)

    @property
    def exit_code(self) -> ExitCode:
        """The process exit code for this kind of error (see :data:`EXIT_CODES`)."""
        for kind in type(self).__mro__:
            if kind in EXIT_CODES:
                return EXIT_CODES[kind]
        raise AssertionError("EdgeTuneError is in EXIT_CODES")  # unreachable


class UsageError(EdgeTuneError):
    """Options or an environment that cannot work together (fix the command line)."""


class DataError(EdgeTuneError):
    """A file, record or model that is not what the command expects (fix the input)."""


class DiskFull(EdgeTuneError):
    """Not enough free disk space: checked before a command writes, or a write that failed
    with "no space left on device" (the message names the path and what was kept)."""


class CheckFailed(EdgeTuneError):
    """The work ran, and its result failed a check (the files written stay for inspection)."""


class NetworkError(EdgeTuneError):
    """A download or hub request failed (retry with a network, or use a local file)."""


class Cancelled(EdgeTuneError):
    """The user stopped the work (Ctrl+C, the TUI's cancel); a resumable run says how."""


# The one mapping from error kind to exit code. A subclass not listed takes its parent's code.
EXIT_CODES: dict[type[EdgeTuneError], ExitCode] = {
    EdgeTuneError: ExitCode.BAD_INPUT,
    UsageError: ExitCode.BAD_INPUT,
    DataError: ExitCode.BAD_INPUT,
    DiskFull: ExitCode.BAD_INPUT,
    CheckFailed: ExitCode.FAILED,
    NetworkError: ExitCode.NETWORK,
    Cancelled: ExitCode.CANCELLED,
}

# The kind to raise again for an exit code reported by another process (the training worker).
_KIND_OF_CODE: dict[int, type[EdgeTuneError]] = {
    ExitCode.FAILED: CheckFailed,
    ExitCode.BAD_INPUT: EdgeTuneError,
    ExitCode.NETWORK: NetworkError,
    ExitCode.CANCELLED: Cancelled,
}


def error_for_exit_code(message: str, code: int) -> EdgeTuneError:
    """The error of the kind that exits with ``code``, for a failure another process reported
    as (message, exit code); an unknown code is :class:`CheckFailed` (the work failed)."""
    return _KIND_OF_CODE.get(int(code), CheckFailed)(message)
