"""``edge-tune data inspect``: a data file as training sees it."""

from __future__ import annotations

import json
from typing import Optional

import typer

from edge_tune.cli.common import err, out, setting
from edge_tune.config import TEMPLATE_HELP
from edge_tune.errors import UsageError

# read as `train` reads them: the same flags, from TrainConfig's fields
Columns, MaxSamples, SystemMode, Reasoning = (setting(name) for name in (
    "columns", "max_samples", "system_mode", "reasoning"))

data_app = typer.Typer(help="Look at training data before training on it.",
                       no_args_is_help=True)


@data_app.command("inspect")
def data_inspect(
    file: str = typer.Argument(..., help="Data file, folder (its train part), saved dataset "
                               "or hub ID: one SOURCE as `train --data` takes it."),
    columns: Columns = None,
    max_samples: MaxSamples = None,
    model: str = typer.Option("default", "--model", "-m", help="Whose tokenizer and chat "
                              "template to count with (same as `train --model`)."),
    seq_len: str = typer.Option("512", "--seq-len", metavar="L", help="Count the examples "
                                "longer than L tokens (training truncates them)."),
    data_format: str = typer.Option("auto", "--format", help="auto | openai | sharegpt | "
                                    "alpaca | completion | text."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", metavar="NAME|FILE",
                                                help=TEMPLATE_HELP),
    system_mode: SystemMode = None,
    reasoning: Reasoning = None,
) -> None:
    """Show a data file as training sees it: format, records, token lengths, trained share.

    Also how many examples --seq-len truncates, and the first example with the trained
    characters highlighted."""
    from edge_tune import api
    from edge_tune.render import Renderer

    try:  # parsed here, not by typer, so a bad value is one `error:` line like the rest
        n_tokens = int(seq_len)
    except ValueError:
        raise UsageError(f"--seq-len {seq_len!r}: expected a whole number of tokens") from None
    with Renderer(err, quiet=as_json) as render:
        source = file
        if columns or max_samples is not None:  # the same reading as train's
            from edge_tune.data.layouts import data_spec

            if max_samples is not None and max_samples < 1:
                raise UsageError(f"--max-samples {max_samples}: expected an integer >= 1")
            source = data_spec(file, columns, max_samples)
        report = api.inspect_data(source, model=model, seq_len=n_tokens, fmt=data_format,
                                  on_event=render, chat_template=chat_template,
                                  system_mode=system_mode, reasoning=reasoning)
    if as_json:
        out.print_json(json.dumps(report))
    else:
        from edge_tune.render.inspect import render_inspect

        render_inspect(report, out)

