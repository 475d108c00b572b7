"""Render `edge-tune eval` (and nothing else): base and tuned side by side, the drift figure,
and a few answers."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

ROWS = (("exact", "exact match"), ("contains", "contains reference"), ("rouge_l", "ROUGE-L F"),
        ("json_valid", "valid JSON"))
SHOWN_ANSWERS = 4


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "nan"
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"


def _change(base, tuned, lower_is_better: bool) -> str:
    if base is None or tuned is None or not (math.isfinite(base) and math.isfinite(tuned)):
        return ""
    delta = tuned - base
    if abs(delta) < 1e-12:
        return "[dim]=[/]"
    better = (delta < 0) == lower_is_better
    return f"[{'green' if better else 'red'}]{delta:+.3f}[/]"


def _short(text: str, limit: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_eval(report: dict, console: Console) -> None:
    """``report``: :meth:`edge_tune.commands.eval.EvalResult.to_dict`."""
    console.print(f"[bold]eval[/] {report['run']}: tuned = {report['tuned']}, base = "
                  f"{report['base']}", highlight=False)
    console.print(f"held-out: {report['data']} ({report['n_examples']} examples, "
                  f"{report['n_tokens']} trained tokens; {report['n_answers']} answers, greedy, "
                  f"≤{report['max_tokens']} tokens)", highlight=False)
    t = Table(title_justify="left", title="base vs tuned (llama.cpp)")
    t.add_column("metric", style="bold")
    for col in ("base", "tuned", "change"):
        t.add_column(col, justify="right")
    loss, ppl = report["loss"], report["perplexity"]
    t.add_row("held-out loss (nats/token)", _num(loss["base"]), _num(loss["tuned"]),
              _change(loss["base"], loss["tuned"], True))
    t.add_row("perplexity", _num(ppl["base"], 2), _num(ppl["tuned"], 2), "")
    base_s, tuned_s = report["scores"]["base"], report["scores"]["tuned"]
    for key, label in ROWS:
        if base_s.get(key) is None and tuned_s.get(key) is None:
            continue
        t.add_row(label, _num(base_s[key]), _num(tuned_s[key]),
                  _change(base_s[key], tuned_s[key], False))
    console.print(t)
    if report.get("training_val_loss") is not None:
        console.print(f"[dim](training's own validation loss, torch, all held-out examples: "
                      f"{report['training_val_loss']:.3f})[/]", highlight=False)
    d = report["drift"]
    console.print(f"[bold]drift[/] on {d['n_prompts']} general prompts: mean KL(base‖tuned) "
                  f"[bold]{d['mean_kl']:.4f}[/] nats/token over the base's greedy answers "
                  f"({d['n_positions']} positions); [bold]{d['changed_share']:.0%}[/] of greedy "
                  "answers changed"
                  + (f" ([bold]{d['changed_beyond_ties']:.0%}[/] beyond near-ties of the base)"
                     if d.get("changed_beyond_ties") is not None else "")
                  + (f", [bold]{d['task_like']}[/] answered like the task"
                     if d.get("task_like") is not None else ""),
                  highlight=False)
    if d.get("hint"):
        console.print(f"[yellow]{d['hint']}[/]", highlight=False)
    if report["answers"]:
        a = Table(title=f"answers (first {min(SHOWN_ANSWERS, len(report['answers']))} of "
                        f"{len(report['answers'])})", title_justify="left", show_lines=True)
        a.add_column("prompt", max_width=28)
        a.add_column("reference", max_width=40)
        a.add_column("base", max_width=40)
        a.add_column("tuned", max_width=40)
        for row in report["answers"][:SHOWN_ANSWERS]:
            a.add_row(_short(row["prompt"]), _short(row["reference"]),
                      f"{_short(row['base'])}\n[dim]ROUGE-L "
                      f"{row['base_scores']['rouge_l']:.2f}[/]",
                      f"{_short(row['tuned'])}\n[dim]ROUGE-L "
                      f"{row['tuned_scores']['rouge_l']:.2f}[/]")
        console.print(a)


def render_tasks(report: dict, console: Console) -> None:
    """``report``: :meth:`edge_tune.commands.eval.TasksResult.to_dict`: one row per task and
    metric, base and tuned side by side."""
    console.print(f"[bold]eval[/] {report['run']}: lm-eval tasks from {report['source']}; "
                  f"tuned = {report['tuned']}, base = {report['base']}", highlight=False)
    t = Table(title_justify="left", title="base vs tuned (llama.cpp, lm-evaluation-harness)")
    for col in ("task", "metric", "n", "base", "tuned", "change"):
        t.add_column(col, justify="left" if col in ("task", "metric") else "right",
                     style="bold" if col == "task" else None)
    for task, row in report["tasks"].items():
        for metric, base in row["base"].items():
            tuned = row["tuned"].get(metric)
            higher = row["higher_is_better"].get(metric)
            t.add_row(task, metric, str(row["n"] if row["n"] is not None else "-"),
                      _num(base, 4), _num(tuned, 4),
                      "" if higher is None else _change(base, tuned, not higher))
    console.print(t)
    if report.get("limit"):
        console.print(f"[dim](at most {report['limit']} examples a task: --limit)[/]",
                      highlight=False)


def render_rewards(report: dict, console: Console) -> None:
    """``report``: :meth:`edge_tune.eval.rewards.RewardsResult.to_dict` (a GRPO run): each
    reward's mean on held-out prompts, base and tuned side by side, and a few answers."""
    console.print(f"[bold]eval[/] {report['run']}: tuned = {report['tuned']}, base = "
                  f"{report['base']}", highlight=False)
    console.print(f"held-out: {report['data']} ({report['n_prompts']} prompts, greedy, "
                  f"≤{report['max_tokens']} tokens)", highlight=False)
    t = Table(title_justify="left", title="rewards, base vs tuned (llama.cpp)")
    t.add_column("reward", style="bold")
    for col in ("base", "tuned", "change"):
        t.add_column(col, justify="right")
    base, tuned = report["rewards"]["base"], report["rewards"]["tuned"]
    for key in base:
        label = "total (weighted)" if key == "reward" else key[len("reward/"):]
        t.add_row(label, _num(base[key]), _num(tuned[key]),
                  _change(base[key], tuned[key], False))
    console.print(t)
    rows = report["answers"][:SHOWN_ANSWERS]
    if rows:
        a = Table(title=f"answers (first {len(rows)} of {len(report['answers'])})",
                  title_justify="left", show_lines=True)
        a.add_column("prompt", max_width=28)
        a.add_column("base", max_width=40)
        a.add_column("tuned", max_width=40)
        for row in rows:
            a.add_row(_short(row["prompt"]),
                      f"{_short(row['base'])}\n[dim]reward {_num(row['base_reward'], 2)}[/]",
                      f"{_short(row['tuned'])}\n[dim]reward {_num(row['tuned_reward'], 2)}[/]")
        console.print(a)
