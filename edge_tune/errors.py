"""The errors users see, and the one table of process exit codes.

Anything the user can fix (a missing file, a bad record, an adapter that does not fit its base)
is raised as one of the kinds below with a single line that names the file/field and what was
expected; a plain :class:`EdgeTuneError` is never raised (``tests/unit/test_error_kinds.py``
refuses one). Front ends print the line and exit with ``exit_code``; they never show a
traceback for it. Any other exception is a bug in edge-tune and keeps its traceback (the CLI
exits :attr:`ExitCode.FAILED`).

Kinds, and what a script calling ``edge-tune`` can do about each exit code:

=================  ===============  ==========================================================
class              exit code        meaning
=================  ===============  ==========================================================
EdgeTuneError      2 BAD_INPUT      the base of every kind (catch it; never raised itself)
UsageError         2 BAD_INPUT      options or an environment that cannot work (a bad value,
                                    options that do not fit together, a path that is not
                                    there, a missing extra)
DataError          2 BAD_INPUT      a file, record or model that is not what was expected
                                    (a malformed record, a model without a chat template, an
                                    adapter that does not fit its base: its shapes or
                                    architecture are the base's or not, so it is the input
                                    that is wrong, not a kind of its own)
Unsupported        2 BAD_INPUT      a valid request that edge-tune, or the tool or format it
                                    goes through, has no way to carry out (an architecture a
                                    converter does not know, DoRA on an embedding, RoPE
                                    scaling a backend cannot express)
DiskFull           2 BAD_INPUT      not enough free space for what a command will write (said
                                    before any work), or a write that ran out of it (the
                                    line names the path and what was kept)
CheckFailed        1 FAILED         the command ran, its result failed a check (verify out of
                                    tolerance, an empty answer, a training process that died)
NetworkError       3 NETWORK        a download or hub request failed: retry, or work offline
Cancelled          130 CANCELLED    stopped by the user (128 + SIGINT, as shells report ^C)
RecordError        2 (DataError)    one training record cannot be encoded (``--skip-invalid``)
ContextOverflow    2 (UsageError)   a prompt longer than the context window (``ctx``)
KVFull             2 (UsageError)   llama.cpp's KV buffer has no room for a batch (the server
                                    evicts idle rows and tries once more)
NoChatTemplate     2 (DataError)    messages asked of a model that has no chat template
ChatTemplateError  2 (DataError)    the chat template refused the conversation
GrammarRefused     2 (DataError)    llama.cpp could not build a sampler from a GBNF grammar
InputTooLong       2 (ContextOver-  an input longer than a side context (scoring, embedding;
                   flow)            ``edge_tune.llama.side``)
=================  ===============  ==========================================================

Three ValueErrors elsewhere are internal signals, each caught in its own module and raised again
as a kind above (never seen by a front end): ``training.backends.mlx_config.NotExpressible``,
``gguf_config.UnsupportedRope`` and ``converters.integrations.ollama.Untranslatable``. The
converters raise these kinds too (``edge_tune.errors`` is a leaf they may import).

Settings are named by the core, spelled by the front end. An error about one setting is raised
with ``setting=`` (the :class:`~edge_tune.config.TrainConfig` field or the command's parameter:
``"adapter"``, ``"seq_len"``, ``"replay"``), the value it refuses as ``value=`` when the line
shows one, and a message that does not spell the option::

    raise UsageError("expected NAME=PATH", setting="adapter", value=spec)

Each front end adds its own spelling with :func:`spelled`: the CLI ``--adapter x=y: expected
NAME=PATH`` (:func:`cli_spelling`, which is also ``str(exc)``: logs, the training worker's
result file and wrapped messages carry the command-line line), the server ``'path' x: ...``
with ``param`` set in OpenAI's error object, the TUI marks the form's field. Hints inside a
message that tell the user what to run next ("give --replay N too", "restart the server with
--chat-template NAME") keep the command line's spelling: they name a command line to type, and
the HTTP API has no field that could do it instead. So do the few lines about two options at once
("--data with --resume only", "--nproc/--nnodes: ...", "--draft-min 3 / --draft-max 2: ..."):
``setting`` names one. Messages about a setting a run.toml set (``run.toml: rank: ...``) name
the file, not a flag.
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


def cli_spelling(setting: str) -> str:
    """The command line's flag for a setting: ``seq_len`` -> ``--seq-len``."""
    return "--" + setting.replace("_", "-")


def _one_line(text: object) -> str:
    # Keep it to one line: front ends print it as-is after "error: ".
    return " ".join(str(text).split("\n")).strip()


class EdgeTuneError(Exception):
    """A user-facing failure: one line of text; its kind decides the exit code.

    ``setting``: the setting the line is about (a TrainConfig field or the command's parameter),
    ``value``: the value of it that is refused, shown before the message. ``str(exc)`` is the
    line as the command line shows it; :attr:`detail` is the message alone."""

    def __init__(self, message: str, *, setting: str | None = None,
                 value: object = None) -> None:
        super().__init__(_one_line(message))
        self.setting = setting
        self.value = None if value is None else _one_line(value)

    def __str__(self) -> str:
        return spelled(self, cli_spelling(self.setting) if self.setting else None)

    def __reduce__(self):  # keep setting and value through pickling (keyword-only arguments)
        return _rebuild, (type(self), self.detail, self.setting, self.value)

    @property
    def detail(self) -> str:
        """The message without the setting's spelling."""
        return self.args[0] if self.args else ""

    @property
    def message(self) -> str:
        """The whole line, as the command line shows it (``str(exc)``)."""
        return str(self)

    @property
    def exit_code(self) -> ExitCode:
        """The process exit code for this kind of error (see :data:`EXIT_CODES`)."""
        for kind in type(self).__mro__:
            if kind in EXIT_CODES:
                return EXIT_CODES[kind]
        raise AssertionError("EdgeTuneError is in EXIT_CODES")  # unreachable


def _rebuild(kind: type[EdgeTuneError], detail: str, setting: str | None,
             value: object) -> EdgeTuneError:
    return kind(detail, setting=setting, value=value)


def spelled(exc: EdgeTuneError, name: str | None, value: object = None) -> str:
    """``exc``'s line with its setting spelled ``name`` (``--adapter``, ``'path'``):
    ``NAME VALUE: message`` (``value`` given here replaces the error's own, e.g. the request
    field as the client sent it), ``NAME: message`` without a value; the message alone when
    the error names no setting or ``name`` is None."""
    if exc.setting is None or name is None:
        return exc.detail
    shown = exc.value if value is None else _one_line(value)
    return f"{name}{'' if shown is None else ' ' + shown}: {exc.detail}"


class UsageError(EdgeTuneError):
    """Options or an environment that cannot work together (fix the command line)."""


class DataError(EdgeTuneError):
    """A file, record or model that is not what the command expects (fix the input)."""


class Unsupported(EdgeTuneError):
    """A valid request that edge-tune, or the tool or format it goes through, cannot carry out
    (an architecture, a feature combination): choose another route (the line says which)."""


class DiskFull(EdgeTuneError):
    """Not enough free disk space: checked before a command writes, or a write that failed
    with "no space left on device" (the message names the path and what was kept)."""


class CheckFailed(EdgeTuneError):
    """The work ran, and its result failed a check (the files written stay for inspection)."""


class NetworkError(EdgeTuneError):
    """A download or hub request failed (retry with a network, or use a local file)."""


class Cancelled(EdgeTuneError):
    """The user stopped the work (Ctrl+C, the TUI's cancel); a resumable run says how."""


class RecordError(DataError):
    """One record cannot be encoded (``FILE:LINE: what``); ``--skip-invalid`` skips it."""


class ContextOverflow(UsageError):
    """The prompt does not fit the context window."""


class KVFull(UsageError):
    """llama_decode found no room in the KV buffer for the batch."""


class NoChatTemplate(DataError):
    """A conversation was asked of a model that has no chat template."""


class ChatTemplateError(DataError):
    """The chat template refused the conversation (its own ``raise_exception``, or a render
    error): the request's fault, not the engine's."""


class GrammarRefused(DataError):
    """llama.cpp could not build a grammar sampler from the GBNF text."""


# The one mapping from error kind to exit code: every kind above is listed (a test checks it);
# a subclass defined elsewhere takes its parent's code.
EXIT_CODES: dict[type[EdgeTuneError], ExitCode] = {
    EdgeTuneError: ExitCode.BAD_INPUT,
    UsageError: ExitCode.BAD_INPUT,
    DataError: ExitCode.BAD_INPUT,
    Unsupported: ExitCode.BAD_INPUT,
    DiskFull: ExitCode.BAD_INPUT,
    CheckFailed: ExitCode.FAILED,
    NetworkError: ExitCode.NETWORK,
    Cancelled: ExitCode.CANCELLED,
    RecordError: ExitCode.BAD_INPUT,
    ContextOverflow: ExitCode.BAD_INPUT,
    KVFull: ExitCode.BAD_INPUT,
    NoChatTemplate: ExitCode.BAD_INPUT,
    ChatTemplateError: ExitCode.BAD_INPUT,
    GrammarRefused: ExitCode.BAD_INPUT,
}

# The kind to raise again for an exit code reported by another process (the training worker).
_KIND_OF_CODE: dict[int, type[EdgeTuneError]] = {
    ExitCode.FAILED: CheckFailed,
    ExitCode.BAD_INPUT: DataError,
    ExitCode.NETWORK: NetworkError,
    ExitCode.CANCELLED: Cancelled,
}


def error_for_exit_code(message: str, code: int) -> EdgeTuneError:
    """The error of the kind that exits with ``code``, for a failure another process reported
    as (message, exit code); an unknown code is :class:`CheckFailed` (the work failed)."""
    return _KIND_OF_CODE.get(int(code), CheckFailed)(message)
