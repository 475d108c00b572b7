"""Draw the ``doctor`` report with rich."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def gpu_line(g: dict) -> str:
    """One CUDA GPU of the report, in words."""
    free = f" ({g['vram_free_gib']} GiB free)" if g.get("vram_free_gib") is not None else ""
    driver = f", driver {g['driver']}" if g.get("driver") else ""
    cuda = f", CUDA {g['cuda']}" if g.get("cuda") else ""
    return (f"{g['name']}, {g['vram_gib']} GiB{free}, compute {g['compute_capability']}, "
            f"bf16 {'yes' if g['bf16'] else 'no'}{driver}{cuda}")


def render_doctor(report: dict, console: Console) -> None:
    hw = report["hardware"]
    t = Table(title="edge-tune doctor", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("OS", f"{hw['os']} ({hw['arch']}), Python {hw['python']}")
    t.add_row("CPU", f"{hw['cpu_model']}: {hw['physical_cores']} cores / "
                     f"{hw['logical_cores']} threads")
    t.add_row("SIMD", " ".join(hw["simd"]) or "-")
    t.add_row("RAM", f"{hw['ram_total_gib']} GiB ({hw['ram_available_gib']} GiB free)")
    t.add_row("Disk free", f"{hw['disk_free_gib']} GiB (cache)")
    for g in hw["cuda_gpus"]:
        t.add_row("CUDA GPU", gpu_line(g))
    if not hw["cuda_gpus"]:
        t.add_row("CUDA GPU", "none")
    apple = hw.get("apple")
    t.add_row("Apple Silicon", f"{apple['chip']}, {apple['unified_memory_gib']} GiB unified, "
                               f"Metal {'yes' if apple['metal'] else 'no'}" if apple else "no")
    console.print(t)

    b = Table(title="training backends", title_justify="left")
    b.add_column("backend", style="bold")
    b.add_column("")
    b.add_column("what / why not")
    for row in report["backends"]:
        if not row["available"]:
            b.add_row(row["name"], "[red]no[/]", row["reason"])
        elif not row.get("auto", True):  # works, but only on request
            b.add_row(row["name"], "[yellow]on request[/]", row["reason"])
        else:
            b.add_row(row["name"], "[green]yes[/]", row["summary"])
    console.print(b)
    console.print("optimizers (train --optimizer): " + "; ".join(
        f"{row['name']}: {', '.join(row.get('optimizers', ()))}" for row in report["backends"]))
    auto = report["auto"]
    if auto["backend"]:
        console.print(f"[bold]auto ->[/] [green]{auto['backend']}[/]: {auto['reason']}")
        if auto["backend"] == "cpu":
            console.print("  bf16 matmuls on this CPU: "
                          + ("yes (training runs in bf16)" if report["cpu_bf16"]
                             else "no (training runs in fp32)"))
    else:
        console.print(f"[red]no backend available:[/] {auto['reason']}")
