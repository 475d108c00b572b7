"""``edge-tune doctor`` and ``demo``: what this machine can do, and the whole job shown on the
embedded model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from edge_tune.cli.common import out


def doctor(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Detect the hardware and show which training backend `auto` picks, and why."""
    from edge_tune import api
    from edge_tune.render.doctor import render_doctor

    report = api.doctor()
    if as_json:
        out.print_json(json.dumps(report))
    else:
        render_doctor(report, out)



def demo(
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run directory."),
    epochs: float = typer.Option(2.0, help="Passes over the demo data."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after N steps."),
) -> None:
    """The whole job on the embedded model: doctor, train on the bundled pirate dataset,
    export to GGUF, and compare base vs tuned answers on held-back prompts."""
    from edge_tune.render.demo import run_demo

    run_demo(out_dir, epochs=epochs, max_steps=max_steps, console=out)

