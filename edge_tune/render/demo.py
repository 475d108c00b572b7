"""``edge-tune demo``: the main job end to end on the embedded default model, rendered with
rich (doctor, training progress, the adapter, then base vs tuned answers as a table)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from edge_tune.demo import compare, demo_data, held_back_prompts


def run_demo(out_dir: Path, epochs: float = 2.0, max_steps: Optional[int] = None,
             console: Optional[Console] = None) -> list[tuple[str, str, str]]:
    from edge_tune import api
    from edge_tune.config import build
    from edge_tune.render import Renderer
    from edge_tune.render.doctor import render_doctor

    console = console or Console()
    console.rule("1. doctor")
    render_doctor(api.doctor(), console)
    console.rule("2. train (pirate persona: every answer starts 'Arr, matey!')")
    cfg = build(None, data=str(demo_data()), out=str(out_dir), epochs=epochs,
                max_steps=max_steps)
    with Renderer(Console(stderr=True)) as render:
        result = api.train(cfg, render)
    r = result.manifest.result
    console.print(f"trained {r.steps} steps in {r.train_seconds:.0f}s "
                  f"({r.tokens_per_second:.0f} tok/s), final loss {r.final_loss:.3f}")
    console.rule("3. export")
    console.print(f"GGUF adapter: {result.run_dir / 'adapter.gguf'} (alpha "
                  f"{result.manifest.adapter.alpha}, rank "
                  f"{result.manifest.adapter.rank})")
    console.rule("4. base vs tuned, through llama.cpp, on prompts held back from training")
    rows = compare(result.run_dir, held_back_prompts())
    table = Table(show_lines=True)
    table.add_column("prompt", style="bold", max_width=24)
    table.add_column("base model")
    table.add_column("with the adapter", style="green")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"try it: [bold]edge-tune chat --adapter {result.run_dir}[/]")
    return rows
