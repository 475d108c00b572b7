"""The ``edge-tune`` command: parse flags, call :mod:`edge_tune.api`, render events.

One module per group of commands (``train``: train and plan; ``run``: chat, serve, bundle;
``export``; ``eval``: verify and eval; ``data``; ``doctor``: doctor and demo); this one
lists them in the order ``--help`` shows them and runs the command line (:func:`main`).
No heavy import happens at module level (``tests/unit/test_import_hygiene.py``), so
``--help`` is instant. A user-facing failure is one line on stderr and the exit code of its kind
(:class:`edge_tune.errors.ExitCode`: 2 bad input, 1 a failed check, 3 network, 130 cancelled)
— never a traceback.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import typer
from rich.markup import escape

from edge_tune.cli import data, doctor, eval, export, run, train
from edge_tune.cli.common import err, out
from edge_tune.errors import EdgeTuneError, ExitCode, UsageError

__all__ = ["app", "main", "out", "err"]

app = typer.Typer(
    name="edge-tune",
    help="Fine-tune a small LLM on your own data and run it offline.\n\n"
         "Typical flow: doctor -> train -> chat. Run `edge-tune demo` to see it all on the "
         "embedded SmolLM2-135M-Instruct model.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context) -> None:
    """With no command, open the terminal UI (the same as `edge-tune tui`)."""
    if ctx.invoked_subcommand is None:
        _open_tui(Path("runs"))


def _open_tui(runs: Path) -> None:
    try:
        import textual  # noqa: F401 - imported here only: --help and the core stay light
    except ImportError:
        raise UsageError("the terminal UI needs textual: pip install 'edge-tune[tui]' (or "
                         "run `edge-tune --help` for the commands)") from None
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("the terminal UI needs an interactive terminal; run "
                         "`edge-tune --help` for the commands")
    from edge_tune.tui import run as run_tui

    run_tui(runs_root=str(runs))


def tui(runs: Path = typer.Option(Path("runs"), "--runs", help="Where runs are listed and "
                                  "new ones are written.")) -> None:
    """Open the terminal UI (also what `edge-tune` alone does).

    Screens: hardware, model & data, train (live loss chart, cancel, resume), adapters
    (export, verify, delete), chat (base vs adapter side by side).

    Keys: F1-F5 switch screens; each screen's keys are in its footer; ctrl+q quits."""
    _open_tui(runs)


# in the order of the work: look at the machine, train, ship, check, use
for name, command in [
        ("doctor", doctor.doctor), ("train", train.train), ("plan", train.plan),
        ("export", export.export), ("convert-base", export.convert_base),
        ("fetch-converter", export.fetch_converter), ("verify", eval.verify),
        ("eval", eval.eval_), ("chat", run.chat), ("serve", run.serve),
        ("bundle", run.bundle), ("demo", doctor.demo), ("tui", tui)]:
    app.command(name)(command)
app.add_typer(data.data_app, name="data")


def _reflowed(text: str) -> str:
    """Help prose as the rich help renderer should get it: the renderer keeps a docstring's
    hard line breaks, so each paragraph's prose is joined into one line, while indented lines
    (examples) and a click ``\\b`` block stay line by line; ``[`` is escaped so that
    "[default: ...]" is not taken for markup and dropped."""
    out = []
    for para in inspect.cleandoc(text).split("\n\n"):
        lines = para.split("\n")
        verbatim = lines[0].strip() == "\b"
        kept: list[str] = []
        for line in lines[1:] if verbatim else lines:
            if verbatim or line.startswith(" ") or not kept or kept[-1].startswith(" "):
                kept.append(line)
            else:
                kept[-1] += " " + line.strip()
        out.append(escape("\n".join(kept)))
    return "\n\n".join(out)


def _tidy_help(command) -> None:
    """Reflow and escape the help of a click command, its parameters and its subcommands."""
    if command.help:
        command.help = _reflowed(command.help)
    for param in command.params:
        if getattr(param, "help", None):
            param.help = _reflowed(param.help)
    for sub in getattr(command, "commands", {}).values():
        _tidy_help(sub)


def _usage_line(exc: typer.TyperException) -> str:
    """A usage error of the command line parser as one line: the message and where the help
    is, e.g. "No such option: --dat (did you mean --data?) (see edge-tune train --help)"."""
    possibilities = getattr(exc, "possibilities", None)
    if type(exc).__name__ == "NoSuchOption" and possibilities:
        from difflib import get_close_matches

        best = get_close_matches(exc.option_name, possibilities, n=1) or sorted(possibilities)
        message = f"{exc.message} (did you mean {best[0]}?)"
    else:
        message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    return f"{message} (see {ctx.command_path} --help)" if ctx is not None else message


def _terminate(signum, frame) -> None:
    """SIGTERM (``timeout``, service managers) stops a command as Ctrl-C does, so the same
    cleanup runs (temp folders removed, training's checkpoint saved). A second SIGTERM ends
    the process at once (the training worker, in its own process group, still saves)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    try:
        command = typer.main.get_command(app)
        _tidy_help(command)
        # Not standalone: the parser would print a usage error as a box of several lines.
        code = command.main(standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(N) from a command
            raise SystemExit(code)
    except typer.TyperException as exc:  # the parser's usage errors (typer's vendored click)
        if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help
            err.print(f"[bold red]error:[/] {escape(_usage_line(exc))}", highlight=False,
                      soft_wrap=True)
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:  # end of input inside a parser prompt
        err.print("[yellow]cancelled[/]")
        raise SystemExit(ExitCode.CANCELLED) from None
    except EdgeTuneError as exc:
        # str(exc): the line with its setting spelled as a flag (errors.cli_spelling: seq_len ->
        # --seq-len); a message may hold [brackets]: print them as they are
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[yellow]cancelled[/]")
        raise SystemExit(ExitCode.CANCELLED) from None
    except Exception as exc:  # a bug: one line for the user, the traceback in a log file
        import os
        import traceback

        if os.environ.get("EDGE_TUNE_DEBUG"):
            raise
        from edge_tune.fsutil import cache_dir, free_bytes, is_disk_full, mib

        if is_disk_full(exc):  # a write nothing named: still one line, and not a bug
            where = getattr(exc, "filename", None) or os.getcwd()
            err.print(f"[bold red]error:[/] {escape(str(where))}: no space left on device "
                      f"({mib(free_bytes(Path(where)))} free); free some space and run the "
                      "command again", highlight=False, soft_wrap=True)
            raise SystemExit(ExitCode.BAD_INPUT) from None
        log = cache_dir() / "last-error.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(traceback.format_exc())
            where = f"traceback in {log}"
        except OSError:
            where = "set EDGE_TUNE_DEBUG=1 for the traceback"
        err.print(f"[bold red]error:[/] internal error: {escape(type(exc).__name__)}: "
                  f"{escape(str(exc).splitlines()[0] if str(exc) else '')} ({where}; please "
                  "report it)", highlight=False, soft_wrap=True)
        raise SystemExit(ExitCode.FAILED) from None


if __name__ == "__main__":
    main()