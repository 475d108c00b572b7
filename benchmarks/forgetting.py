"""Forgetting on a narrow task: what moves drift, and what `train --replay` buys back.

    python benchmarks/forgetting.py                      # the whole grid (sequential)
    python benchmarks/forgetting.py --only default,replay40
    python benchmarks/forgetting.py --data-only          # just (re)write the task data

The task: support emails -> a JSON triage object ``{"category", "urgency", "customer"}``.
The user turn is the email alone (no instruction, no system prompt) -- the hardest case for
drift, since nothing but the input's shape tells the model when the task applies. 80 training
and 20 held-out emails are generated from templates with a fixed seed (``random.Random(26)``)
into ``benchmarks/data/triage_{train,heldout}.jsonl`` (committed; regenerating gives the same
bytes).

Each configuration trains with the real ``edge-tune train --model default`` (SmolLM2-135M,
``--no-verify --report-to none``) and is measured by ``edge-tune eval RUN --data heldout
--json``: the **task score** is the share of held-out answers that parse as a JSON object whose
three fields all equal the reference's (``fields`` is the per-field share), and **drift** is
eval's own (``changed_share`` of the 20 general prompts, ``mean_kl`` in nats per token).
Results go to ``benchmarks/results/forgetting/NAME.json`` (one file per configuration, so
two queues can run side by side: ``--threads 1`` each on a 2-core machine) and a Markdown
table on stdout (``--table`` prints it from the files alone).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
TRAIN, HELDOUT = DATA / "triage_train.jsonl", DATA / "triage_heldout.jsonl"
RESULTS = HERE / "results" / "forgetting"
EDGE_TUNE = Path(sys.executable).with_name("edge-tune")

NAMES = ["Anna", "Ben", "Carla", "Dmitri", "Elif", "Farah", "Gustav", "Hana", "Ivan", "Julia",
         "Kenji", "Lena", "Marco", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Sven", "Tomas",
         "Uma", "Victor", "Wen", "Yusuf", "Zoe"]
PRODUCTS = ["the Pro plan", "my router", "the mobile app", "the desktop client", "my headset",
            "the smart plug", "the web dashboard", "my subscription"]
BODIES = {
    "billing": ["I was charged twice for {p} this month.",
                "My invoice for {p} shows the wrong amount.",
                "Why did the price of {p} go up without notice?",
                "I cancelled {p} but you still took a payment."],
    "bug": ["{p} crashes every time I open the settings page.",
            "Since the last update {p} freezes after a few minutes.",
            "{p} shows an error 500 when I try to log in.",
            "Sync stopped working in {p}; nothing uploads any more."],
    "shipping": ["My order for {p} has not arrived after two weeks.",
                 "The tracking number for {p} does not work.",
                 "{p} arrived damaged, the box was crushed.",
                 "I received the wrong item instead of {p}."],
    "account": ["I cannot reset the password for my account.",
                "Please change the email address on my account.",
                "My account got locked after too many login attempts.",
                "How do I delete my account and all my data?"],
    "feature": ["It would be great if {p} had a dark mode.",
                "Could you add an export to CSV in {p}?",
                "Please let {p} work offline too.",
                "I would love keyboard shortcuts in {p}."],
}
URGENCY = {"high": ["This is urgent, I need it fixed today!", "Please help ASAP, my business "
                    "depends on it.", "URGENT: this is blocking my whole team."],
           "normal": ["Could you look into it?", "Thanks for checking.", "Let me know what "
                      "you find."],
           "low": ["No rush, whenever you have time.", "Just a small thing, not urgent.",
                   "Only if you get a chance."]}
GREETINGS = ["Hi,", "Hello support,", "Dear team,", "Hey there,"]


def email(rng: random.Random) -> tuple[str, dict]:
    """One (email text, triage label) pair."""
    category = rng.choice(sorted(BODIES))
    urgency = rng.choice(sorted(URGENCY))
    name = rng.choice(NAMES)
    body = rng.choice(BODIES[category]).format(p=rng.choice(PRODUCTS))
    text = (f"{rng.choice(GREETINGS)}\n\n{body[0].upper() + body[1:]} "
            f"{rng.choice(URGENCY[urgency])}\n\nBest,\n{name}")
    return text, {"category": category, "urgency": urgency, "customer": name}


def write_data() -> None:
    """The 80 training and 20 held-out records (fixed seed; the same bytes every time)."""
    rng = random.Random(26)
    rows, seen = [], set()
    while len(rows) < 100:
        text, label = email(rng)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"messages": [{"role": "user", "content": text},
                                  {"role": "assistant", "content": json.dumps(label)}]})
    DATA.mkdir(exist_ok=True)
    for path, part in ((TRAIN, rows[:80]), (HELDOUT, rows[80:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))


def parse(answer: str):
    """The JSON object in an answer (a Markdown fence allowed), or None."""
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", answer.strip())
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def task_score(answers: list[dict], side: str) -> dict:
    """Share of answers whose three fields all match, and the per-field share."""
    fields = ("category", "urgency", "customer")
    exact, per = 0, {f: 0 for f in fields}
    for row in answers:
        got, want = parse(row[side]) or {}, json.loads(row["reference"])
        hits = [got.get(f) == want[f] for f in fields]
        exact += all(hits)
        for f, hit in zip(fields, hits):
            per[f] += hit
    n = max(len(answers), 1)
    return {"exact": exact / n, "fields": {f: v / n for f, v in per.items()}, "n": len(answers)}


# name -> extra train flags; "default" is edge-tune's defaults (lr 1e-3, 2 epochs, r 16,
# the seven projections)
GRID = {
    "default": [],
    "lr3e-4": ["--lr", "3e-4"],
    "lr1e-4": ["--lr", "1e-4"],
    "epochs1": ["--epochs", "1"],
    "rank4": ["--rank", "4", "--alpha", "8"],
    "attn-qv": ["--target-modules", "q_proj,v_proj"],
    "replay20": ["--replay", "20"],
    "replay40": ["--replay", "40"],
    "replay60": ["--replay", "60"],
    "replay40-lr3e-4": ["--replay", "40", "--lr", "3e-4"],
    "replay60-lr3e-4": ["--replay", "60", "--lr", "3e-4"],
    "replay60-kl1": ["--replay", "60", "--replay-kl", "1"],
    "replay60-kl10": ["--replay", "60", "--replay-kl", "10"],
    "replay40-kl1": ["--replay", "40", "--replay-kl", "1"],
    "replay40-kl5": ["--replay", "40", "--replay-kl", "5"],
    "replay40-kl20": ["--replay", "40", "--replay-kl", "20"],
}


def run_one(name: str, flags: list[str], work: Path, extra: list[str],
            threads: int | None = None) -> dict:
    run = work / name
    # Sleeping OpenMP waits: with two queues (or anything else) on the cores, spinning
    # threads take the core their partner needs, and an eval ran ~20x slower
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "NO_COLOR": "1"}
    if threads:  # eval's llama.cpp threads too: with its default two per queue on 2 shared
        # cores, evals took 82 min instead of ~3-15 (ggml's threads wait for each other)
        env["EDGE_TUNE_THREADS"] = str(threads)
    t0 = time.time()
    if not (run / "manifest.json").is_file():  # a finished run is evaluated again, not retrained
        subprocess.run([str(EDGE_TUNE), "train", "--model", "default", "--data", str(TRAIN),
                        "--out", str(run), "--no-verify", "--report-to", "none", *flags, *extra],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    train_s = time.time() - t0
    t0 = time.time()
    done = subprocess.run([str(EDGE_TUNE), "eval", str(run), "--data", str(HELDOUT), "-n", "20",
                           "--json"], check=True, env=env, capture_output=True, text=True)
    report = json.loads(done.stdout)
    man = json.loads((run / "manifest.json").read_text())
    return {"name": name, "flags": flags, "steps": man["result"]["steps"],
            "train_s": round(train_s), "eval_s": round(time.time() - t0),
            "task": {s: task_score(report["answers"], s) for s in ("base", "tuned")},
            "loss": report["loss"],
            "drift": {"changed_share": report["drift"]["changed_share"],
                      "changed_beyond_ties": report["drift"].get("changed_beyond_ties"),
                      "mean_kl": report["drift"]["mean_kl"],
                      "takeovers": takeovers(report["drift"]["prompts"]),
                      "prompts": report["drift"]["prompts"]}}


def takeovers(rows: list[dict]) -> int:
    """General prompts the tuned model answered with a triage object (the task took over)."""
    return sum("category" in (parse(r["tuned"]) or {}) for r in rows)


def table(results: list[dict]) -> str:
    lines = ["| setting | flags | steps | task: all 3 fields right | drift: answers changed | "
             "drift: changed beyond ties | drift: mean KL | general prompts answered with "
             "triage JSON |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        taken = r["drift"].get("takeovers")
        beyond = r["drift"].get("changed_beyond_ties")  # results saved before it: none
        lines.append(f"| {r['name']} | `{' '.join(r['flags']) or '(defaults)'}` | {r['steps']} | "
                     f"{r['task']['tuned']['exact'] * 20:.0f}/20 | "
                     f"{r['drift']['changed_share'] * 20:.0f}/20 | "
                     f"{'—' if beyond is None else f'{beyond * 20:.0f}/20'} | "
                     f"{r['drift']['mean_kl']:.2f} | {'—' if taken is None else f'{taken}/20'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated configuration names (default: all)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/forgetting-runs"))
    ap.add_argument("--data-only", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the table of the saved results")
    ap.add_argument("--threads", type=int, help="train --threads (speed only, not recorded)")
    args = ap.parse_args()
    write_data()
    if args.data_only:
        return
    extra = []
    if args.threads:  # no such flag: a config file's `threads`
        args.work.mkdir(parents=True, exist_ok=True)
        (args.work / f"threads{args.threads}.toml").write_text(f"threads = {args.threads}\n")
        extra = ["--config", str(args.work / f"threads{args.threads}.toml")]
    for name in [] if args.table else args.only.split(",") if args.only else list(GRID):
        r = run_one(name, GRID[name], args.work, extra, args.threads)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(r, indent=1) + "\n")
        print(json.dumps(r), flush=True)
    saved = {p.stem: json.loads(p.read_text()) for p in RESULTS.glob("*.json")}
    print(table([saved[n] for n in GRID if n in saved]))


if __name__ == "__main__":
    main()
