"""Draw the ``data inspect`` report with rich: a summary table, the token-length histogram as
a bar chart, and the first example with its trained characters highlighted."""

from __future__ import annotations

from itertools import pairwise

from rich.console import Console
from rich.table import Table
from rich.text import Text

TRAINED = "bold green"
CONTEXT = "dim"
CUT = "red"
# Without any styling (output piped to a file) the trained spans are bracketed instead.
OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧
SCISSORS = "\u2702 --seq-len cuts here \u2702"
BLOCKS = " \u258f\u258e\u258d\u258c\u258b\u258a\u2589\u2588"  # eighths: " ▏▎▍▌▋▊▉█"


def bar(value: float, peak: float, width: int = 30) -> str:
    """A horizontal bar of unicode blocks, ``width`` cells at ``peak``, in eighths of a cell."""
    if peak <= 0 or value <= 0:
        return ""
    eighths = max(1, round(value / peak * width * 8))
    full, part = divmod(eighths, 8)
    return BLOCKS[8] * full + (BLOCKS[part] if part else "")


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def ignored_text(ignored: dict) -> str:
    """``id (200 records), source (200)``, or "none" (nothing in the file went unread)."""
    if not ignored:
        return "none: every key was read"
    from collections import Counter

    from edge_tune.data.keys import summary

    return summary(Counter(ignored)) + " (not read: see docs/data.md)"


def summary_table(r: dict) -> Table:
    t = Table(title="edge-tune data inspect", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("file", r["path"])
    fmt = r["format"]
    if fmt == "mixed":
        fmt += " (" + ", ".join(f"{s}: {f}" for s, f in r["formats"].items()) + ")"
    t.add_row("format", fmt)
    t.add_row("records", f"{r['records']}" + (f" ({r['skipped']} skipped)" if r["skipped"]
                                              else ""))
    n_ex = r.get("examples", r["records"])
    if r.get("pairs"):
        t.add_row("pairs", f"{r['pairs']} preference pairs (DPO/ORPO): a chosen and a rejected "
                           "answer each, so twice as many sequences")
    elif n_ex != r["records"]:
        t.add_row("examples", f"{n_ex} (one per assistant turn where the chat template "
                              "rewrites earlier turns)")
    tools = r.get("tools") or {}
    if any(tools.values()):
        t.add_row("tool use", f"{tools['records_with_tools']} records with tools, "
                              f"{tools['tool_calls']} tool calls, "
                              f"{tools['tool_results']} tool results (context)")
    if tools.get("context_turns"):
        n = tools["context_turns"]
        t.add_row("weight 0", f"{n} assistant turn{' is' if n == 1 else 's are'} context only")
    kto = r.get("kto") or {}
    if any(kto.values()):
        t.add_row("KTO labels", f"{kto['desirable']} desirable, {kto['undesirable']} "
                                "undesirable answers (label / kto_tag)")
    keys = r.get("keys") or {}
    if keys.get("used"):
        t.add_row("keys read", "; ".join(
            f"{k} -> {v['to']}" for k, v in keys["used"].items()
            if v["to"] and k.rsplit(".", 1)[-1] not in ("role", "content", "from", "value")))
    t.add_row("ignored keys", Text(ignored_text(keys.get("ignored") or {}),
                                   style="yellow" if keys.get("ignored") else "green"))
    t.add_row("model", r["model"])
    L = r["lengths"]
    t.add_row("tokens / example", f"min {L['min']}  median {L['median']}  p95 {L['p95']}  "
                                  f"max {L['max']}  (mean {L['mean']})")
    t.add_row("tokens", f"{r['tokens_total']:,} in all, {r['tokens_trained']:,} trained "
                        f"({100 * r['trained_share']:.1f}%)")
    n, trunc = r.get("examples", r["records"]), r["truncated"]
    cut = f"{trunc} of {n} examples truncated ({_pct(trunc, n)})"
    if trunc:
        cut += (f"; {r['tokens_trained_within_seq_len']:,} of {r['tokens_trained']:,} "
                "trained tokens kept")
        if r["dropped"]:
            d = r["dropped"]
            cut += (f"; {d} {'loses' if d == 1 else 'lose'} every trained token and "
                    f"{'is' if d == 1 else 'are'} skipped")
    style = "green" if not trunc else "yellow" if trunc <= 0.05 * n else "red"
    t.add_row(f"--seq-len {r['seq_len']}", Text(cut, style=style))
    return t


def histogram_table(r: dict, width: int = 30) -> Table:
    """One row per bin: the token range, a bar, the count. Bins past --seq-len are red and
    marked "✂ all cut", the bin that holds it yellow and "✂ some cut"."""
    t = Table(title="token lengths", title_justify="left", box=None, show_header=True,
              pad_edge=False)
    t.add_column("tokens", justify="right")
    t.add_column("", no_wrap=True)
    t.add_column("examples", justify="right")
    t.add_column("")
    bins, seq_len = r["histogram"], r["seq_len"]
    peak = max((b["count"] for b in bins), default=0)
    for b in bins:
        style = "red" if b["lo"] > seq_len else "yellow" if b["hi"] > seq_len else "cyan"
        span = f"{b['lo']}" if b["lo"] == b["hi"] else f"{b['lo']}-{b['hi']}"
        note = ("" if b["hi"] <= seq_len or not b["count"]
                else "\u2702 all cut" if b["lo"] > seq_len else "\u2702 some cut")
        t.add_row(span, Text(bar(b["count"], peak, width), style=style), str(b["count"]),
                  Text(note, style=style))
    return t


def example_text(example: dict, marks: bool = False) -> Text:
    """The rendered first example: trained characters bold green, the rest dim; with
    ``marks`` trained spans are also bracketed ⟦ ⟧ (for output without styles). The part past
    --seq-len, if any, follows a red cut marker."""
    text, spans, cut = example["text"], example["spans"], example.get("cut")
    bounds = {0, len(text)} | {x for span in spans for x in span}
    if cut is not None:
        bounds.add(min(cut, len(text)))
    edges = sorted(x for x in bounds if 0 <= x <= len(text))
    out = Text()
    for a, b in pairwise(edges):
        if cut is not None and a == cut:
            out.append(SCISSORS, style=f"bold {CUT}")
        is_trained = any(s <= a and b <= e for s, e in spans)
        chunk = text[a:b]
        if is_trained and marks:
            chunk = OPEN + chunk + CLOSE
        out.append(chunk, style=TRAINED if is_trained else CONTEXT)
    if cut is not None and cut >= len(text):
        out.append(SCISSORS, style=f"bold {CUT}")
    return out


def legend(marks: bool = False) -> Text:
    t = Text("legend: ")
    t.append(f"{OPEN}trained{CLOSE}" if marks else "trained", style=TRAINED)
    t.append(" (loss is taken on these tokens)  ")
    t.append("context", style=CONTEXT)
    t.append(" (seen, not trained)")
    return t


def render_inspect(report: dict, console: Console) -> None:
    console.print(summary_table(report))
    console.print(histogram_table(report))
    _example(report["first_example"], "first example", console)
    if report.get("first_tool_example"):
        _example(report["first_tool_example"], "first example with tool use", console)


def _example(ex: dict, title: str, console: Console) -> None:
    marks = console.color_system is None  # no styles: bracket the trained spans instead
    where = f"{ex['source']}:{ex['line']}" if ex.get("source") else f"record {ex['line']}"
    console.print()
    parts = [ex] + list(ex.get("more") or [])
    console.print(Text(f"{title} ({where}), as the model sees it:", style="bold"))
    if ex.get("tools"):
        console.print(Text(f"tools given to the template: {', '.join(ex['tools'])}"))
    console.print(legend(marks))
    if ex.get("rejected"):  # a preference pair: both sides, the answers are what is trained
        parts = [("chosen: its answer's log-probability is pushed up", ex),
                 ("rejected: its answer's log-probability is pushed down", ex["rejected"])]
    else:
        parts = [(f"example {k} of {len(parts)} of this record" if len(parts) > 1 else "", part)
                 for k, part in enumerate(parts, 1)]
    for label, part in parts:
        console.rule(label, style="dim")
        console.print(example_text(part, marks), highlight=False, markup=False, soft_wrap=True)
    console.rule(style="dim")
