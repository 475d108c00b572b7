"""Render `edge-tune plan` (and nothing else): a memory breakdown, time, and what changed."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def render_plan(report: dict, console: Console) -> None:
    est = report["estimate"]
    t = Table(title=f"plan: {report['model']} on {report['backend']} ({est['precision']}), "
                    f"{report['records']} training records", title_justify="left")
    t.add_column("memory at the peak", style="bold")
    t.add_column("GiB", justify="right")
    for name, gib in est["parts_gib"].items():
        t.add_row(name, f"{gib:.2f}")
    t.add_row("[bold]peak (training)[/]", f"[bold]{sum(est['parts_gib'].values()):.2f}[/]")
    t.add_row("peak while loading weights", f"{est['load_peak_gib']:.2f}")
    t.add_row("budget (free memory)", f"{report['budget_gib']:.2f}")
    console.print(t)
    minutes = est["total_seconds"] / 60
    console.print(f"time: ~{est['seconds_per_step']:.1f}s per step x {est['total_steps']} steps "
                  f"= ~{minutes:.0f} min ({est['tokens_per_step']} tokens per step; a rough "
                  "guide from measured throughput)")
    s = report["settings"]
    console.print("settings: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in s.items()))
    for change in report["changes"]:
        console.print(f"[yellow]changed to fit:[/] {change}")
    if report["fits"]:
        console.print("[green]fits[/]" + (" as given" if not report["changes"] else ""))
    else:
        console.print("[red]does not fit[/] even at batch size 1: `train` would refuse")
