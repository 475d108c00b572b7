"""Render `edge-tune plan` (and nothing else): a memory breakdown, time, and what changed."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from edge_tune.planner import disk_bytes, minutes_text


def render_plan(report: dict, console: Console) -> None:
    if "compare" in report:
        render_comparison(report, console)
        return
    est = report["estimate"]
    t = Table(title=f"plan: {report['model']} on {report['backend']} ({est['precision']}), "
                    f"{report['records']} training records", title_justify="left")
    t.add_column("memory at the peak", style="bold")
    t.add_column("GiB", justify="right")
    for name, gib in est["parts_gib"].items():
        t.add_row(name, f"{gib:.2f}")
    t.add_row("[bold]peak (training)[/]", f"[bold]{sum(est['parts_gib'].values()):.2f}[/]")
    t.add_row("peak while loading weights", f"{est['load_peak_gib']:.2f}")
    if est.get("verify_peak_gib"):
        t.add_row("peak while verifying (after training)", f"{est['verify_peak_gib']:.2f}")
    t.add_row("budget (free memory)", f"{report['budget_gib']:.2f}")
    console.print(t)
    console.print(f"time: ~{est['seconds_per_step']:.1f}s per step x {est['total_steps']} steps "
                  f"= {minutes_text(est['total_seconds'])} ({est['tokens_per_step']} tokens "
                  "per step; a rough guide from measured throughput)")
    need = disk_bytes({k: v * 2**30 for k, v in est["output_gib"].items()}, full=False)
    console.print(f"disk: ~{_size(need['total'] / 2**30)} free in the run folder at its fullest "
                  f"(adapter {_size(need['weights'] / 2**30)}, checkpoint "
                  f"{_size(need['checkpoint'] / 2**30)}, GGUF {_size(need['gguf'] / 2**30)}); "
                  "`train` checks it before it starts")
    s = report["settings"]
    console.print("settings: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in s.items()))
    if report.get("step"):
        console.print(step_line(report["step"], report.get("preset")), highlight=False)
    for change in report["changes"]:
        console.print(f"[yellow]changed to fit:[/] {change}")
    if report["fits"]:
        console.print("[green]fits[/]" + (" as given" if not report["changes"] else ""))
    elif est.get("verify_peak_gib", 0) > report["budget_gib"] and \
            est["peak_gib"] >= est["verify_peak_gib"]:
        console.print(f"[red]does not fit[/]: verify after training needs "
                      f"{est['verify_peak_gib']:.2f} GiB: `train` would refuse (free memory, "
                      "or pass --no-verify)")
    else:
        console.print("[red]does not fit[/] even at batch size 1: `train` would refuse")


def step_line(step: dict, preset: str | None = None) -> str:
    """``plan``'s line on the LoRA update's effective step size (lr x alpha/r), beside
    edge-tune's default's, so a recipe copied from another tool shows what it changes."""
    root = "sqrt(r)" if step["rslora"] else "r"
    ratio = step["step_size"] / step["default_step_size"]
    versus = "the same as" if abs(ratio - 1) < 1e-9 else (
        f"{ratio:.3g}x" if ratio > 1 else f"1/{1 / ratio:.3g} of")
    source = f" (preset {preset})" if preset and preset != "edge-tune" else ""
    return (f"step size{source}: lr {step['lr']:g} x alpha/{root} {step['alpha']:g}/"
            f"{step['rank']} = {step['step_size']:.3g}; {versus} edge-tune's default "
            f"({step['default_step_size']:.3g})")


def _size(gib: float) -> str:
    return f"{gib * 1024:.1f} MiB" if gib < 1 else f"{gib:.2f} GiB"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def render_comparison(report: dict, console: Console) -> None:
    """``plan --full``: the LoRA and the full fine-tuning plan for the same data, side by
    side (memory at the peak by part, time, what the run writes)."""
    lora, full = report["compare"]["lora"], report["compare"]["full"]
    t = Table(title=f"plan: {report['model']} on {report['backend']}, "
                    f"{report['records']} training records: LoRA vs full fine-tuning",
              title_justify="left")
    t.add_column("", style="bold")
    t.add_column(f"LoRA (r={report.get('lora_rank', 16)})", justify="right")
    t.add_column("full", justify="right")
    t.add_row("trained parameters", f"{lora['trained_parameters'] / 1e6:.2f}M",
              f"{full['trained_parameters'] / 1e6:.2f}M")
    for part in full["parts_gib"]:
        t.add_row(f"memory: {part}", _size(lora["parts_gib"].get(part, 0.0)),
                  _size(full["parts_gib"][part]))
    t.add_row("[bold]memory: peak (training)[/]", f"[bold]{_size(lora['peak_gib'])}[/]",
              f"[bold]{_size(full['peak_gib'])}[/]")
    t.add_row("memory: peak while loading", _size(lora["load_peak_gib"]),
              _size(full["load_peak_gib"]))
    if full.get("verify_peak_gib"):
        t.add_row("memory: peak while verifying", _size(lora["verify_peak_gib"]),
                  _size(full["verify_peak_gib"]))
    t.add_row("time per step", f"{lora['seconds_per_step']:.2f} s",
              f"{full['seconds_per_step']:.2f} s")
    t.add_row("time, whole run", _duration(lora["total_seconds"]),
              _duration(full["total_seconds"]))
    t.add_row("output: training format", _size(lora["output_gib"]["training format"]),
              _size(full["output_gib"]["training format"]))
    t.add_row("output: GGUF", _size(lora["output_gib"]["gguf"]) + " adapter",
              _size(full["output_gib"]["gguf"]) + " model (F16)")
    t.add_row("fits the budget", "yes" if lora["fits"] else "[red]no[/]",
              "yes" if full["fits"] else "[red]no[/]")
    console.print(t)
    console.print(f"budget (free memory): {report['budget_gib']:.2f} GiB; times are a rough "
                  "guide from measured throughput")
    for name, side in (("LoRA", lora), ("full", full)):
        for change in side["changes"]:
            console.print(f"[yellow]{name}, changed to fit:[/] {change}")
    if not full["fits"]:
        console.print("[red]full fine-tuning does not fit[/]: `train --full` would refuse; "
                      "LoRA " + ("fits" if lora["fits"] else "does not fit either"))
