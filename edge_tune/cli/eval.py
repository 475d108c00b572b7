"""``edge-tune verify`` and ``eval``: does llama.cpp run what was trained, and did the
fine-tune help."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from edge_tune.cli.common import err, out
from edge_tune.errors import ExitCode


def verify(
    run: Path = typer.Argument(..., help="A run directory (manifest.json names its data and "
                               "base)."),
    base: Optional[Path] = typer.Option(None, help="Base GGUF to check on [default: the "
                                        "run's base]."),
    merged: Optional[Path] = typer.Option(None, "--merged", help="Check this merged export "
                                          "(from `export --merge`) instead of adapter.gguf."),
    prompts: int = typer.Option(3, "--prompts", "-n", help="Held-back examples to use."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable report."),
) -> None:
    """Check that llama.cpp runs what was trained: torch+PEFT vs llama.cpp on held-back
    prompts from the run's validation data (else its training data).

    Reports the relative error of the adapter's effect on an F32 copy of the base (exact:
    catches wrong alpha, rsLoRA scale, q/k layout), top-1 agreement and mean KL of the tuned
    model on the real (quantized) base, and greedy answers side by side. Exit 0 only within
    tolerance, 1 when out of it."""
    from edge_tune import api
    from edge_tune.render import Renderer

    with Renderer(err, quiet=as_json) as render:
        report = api.verify(run, base=base, merged=merged, on_event=render, n_prompts=prompts)
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
    else:
        from rich.table import Table

        t = report.tolerance
        out.print(f"checked: {report.checked} on {report.n_prompts} held-back prompts "
                  f"({report.n_positions} positions)")
        out.print(f"  adapter effect, F32 base: relative error {report.effect_rel_err:.2e}"
                  f"  (limit {t['effect_rel_err']})")
        if report.no_effect:
            from edge_tune.verify import no_effect_line

            out.print(f"[yellow]warning[/]: {no_effect_line(report)}", highlight=False)
        out.print(f"  tuned model, real base:   top-1 agreement {report.top1:.1%}"
                  f" (min {t['top1_min']:.0%}), mean KL {report.kl:.4f} "
                  f"(max {t['kl_max']})")
        table = Table("prompt", report.framework, "llama.cpp",
                      title="greedy answers")
        for g in report.greedy:
            table.add_row(g["prompt"][-60:].strip(), g["torch"], g["llama_cpp"])
        out.print(table)
        out.print("[green]ok[/]: within tolerance" if report.ok else
                  "[red]out of tolerance[/]: " + "; ".join(report.failures))
    if not report.ok:
        raise typer.Exit(ExitCode.FAILED)


# --- eval ------------------------------------------------------------------------------------

def eval_(
    run: Path = typer.Argument(..., help="A run directory (or its adapter.gguf): its manifest "
                               "names the base, chat template and held-out data."),
    data: Optional[Path] = typer.Option(None, "--data", help="Held-out examples (any format "
                                        "train reads) [default: the run's validation data]."),
    merged: Optional[Path] = typer.Option(None, "--merged", help="Evaluate this merged GGUF "
                                          "(from `export --merge`) instead of base + "
                                          "adapter.gguf."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Max tokens per generated answer."),
    prompts: int = typer.Option(32, "--prompts", "-n", help="At most this many held-out "
                                "records."),
    tasks: Optional[Path] = typer.Option(None, "--tasks", metavar="FILE_OR_DIR",
                                         help="Run lm-evaluation-harness tasks instead: a "
                                         "task YAML (local data) or a folder of them."),
    limit: Optional[int] = typer.Option(None, "--limit", help="With --tasks: at most this "
                                        "many examples a task."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable report."),
) -> None:
    """Did the fine-tune get better at its task, and did it break anything else? Base and
    tuned side by side in llama.cpp (what ships).

    With --tasks, standard benchmarks instead: lm-evaluation-harness tasks (its own YAML,
    data in local files) scored on base and tuned (needs `pip install 'lm-eval[api]'`).

    Reports held-out loss and perplexity per trained token, greedy answers scored against the
    references (exact match, contains, ROUGE-L, valid JSON where the reference is JSON), and
    drift: mean KL(base || tuned) over the base's greedy answers to general prompts shipped
    with edge-tune, and the share of those answers that changed. See docs/eval.md."""
    from edge_tune import api
    from edge_tune.render import Renderer

    if tasks is not None:
        _eval_tasks(run, tasks, merged, limit, data, as_json)
        return
    if limit is not None:
        from edge_tune.errors import UsageError

        raise UsageError("--limit goes with --tasks (held-out records: --prompts)")
    with Renderer(err, quiet=as_json) as render:
        report = api.evaluate(run, data=data, merged=merged, max_tokens=max_tokens,
                          n_prompts=prompts, on_event=render).to_dict()
    if as_json:
        out.print_json(json.dumps(report))
    else:
        from edge_tune.render.eval import render_eval, render_rewards

        (render_rewards if "rewards" in report else render_eval)(report, out)



def _eval_tasks(run: Path, tasks: Path, merged: Optional[Path], limit: Optional[int],
                data: Optional[Path], as_json: bool) -> None:
    from edge_tune import api
    from edge_tune.errors import UsageError
    from edge_tune.render import Renderer

    if data is not None:
        raise UsageError("--tasks runs lm-eval tasks on their own data; leave out --data")
    with Renderer(err, quiet=as_json) as render:
        report = api.evaluate_tasks(run, tasks, merged=merged, limit=limit,
                                    on_event=render).to_dict()
    if as_json:
        out.print_json(json.dumps(report))
    else:
        from edge_tune.render.eval import render_tasks

        render_tasks(report, out)
