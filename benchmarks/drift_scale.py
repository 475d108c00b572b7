"""How small must an adapter's effect be before greedy answers stop changing?

    python benchmarks/drift_scale.py RUN --scales 1,0.1,0.03,0.01,0.003

Runs eval's drift check (:func:`edge_tune.eval.drift.drift`: the 20 shipped general prompts,
64 greedy tokens each, in llama.cpp) with RUN's adapter applied at a fraction of its scale
(llama.cpp's ``lora_scale``): the same direction of change, smaller. Prints one JSON line
per scale — ``changed`` (of 20 answers), ``beyond_ties`` (of them, those that part where the
base was decided: eval's ``changed_beyond_ties``) and ``mean_kl`` (nats/token) — and writes
them to ``benchmarks/results/forgetting/scale-RUNNAME[-exact].json``. Set
``EDGE_TUNE_THREADS=1`` on a shared machine. docs/eval.md ("Forgetting") reads it.

    python benchmarks/drift_scale.py RUN --rescore default,replay40,...

instead adds ``changed_beyond_ties`` (and per prompt ``changed_at_tie``, ``divergence_gap``)
to the saved ``benchmarks/results/forgetting/NAME.json`` of ``benchmarks/forgetting.py``: the
answers stay as measured there, and only RUN's base (no adapter: the same for every NAME
trained on it) is run, along each saved base answer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from edge_tune.eval.measure import Side

RESULTS = Path(__file__).resolve().parent / "results" / "forgetting"


class Scaled(Side):
    """The run's adapter at ``scale`` (eval's Side uses scale 1)."""

    def __init__(self, engine, adapter: str, scale: float) -> None:
        super().__init__(engine, adapter)
        self.scale = scale

    def use(self):
        if self.engine.active_mix != ((self.adapter, self.scale),):
            self.engine.activate(self.adapter, self.scale)
        return self.engine


def rescore(engine, tok, system_mode: str, names: list[str]) -> None:
    """Tie-aware changed share of saved forgetting results, from the base's logits along each
    saved base answer (see the module docstring)."""
    from edge_tune.data.template import fold_system, render
    from edge_tune.eval.drift import TIE_MARGIN, changed_at_tie, divergence_gap
    from edge_tune.eval.measure import log_softmax

    engine.activate(None)
    along: dict = {}  # (prompt, base answer) -> (answer ids, base log-probs along them)
    for name in names:
        path = RESULTS / f"{name}.json"
        result = json.loads(path.read_text())
        rows = result["drift"]["prompts"]
        for row in rows:
            gap = None
            if row["changed"]:
                key = (row["prompt"], row["base"])
                if key not in along:
                    msgs = [{"role": "user", "content": row["prompt"]}]
                    shown = fold_system(msgs) if system_mode == "fold" else msgs
                    prompt_ids = tok(render(tok, shown, True),
                                     add_special_tokens=False)["input_ids"]
                    answer_ids = tok(row["base"], add_special_tokens=False)["input_ids"]
                    ids = prompt_ids + answer_ids
                    logits = engine.logits(ids)[len(prompt_ids) - 1:]
                    along[key] = (answer_ids, log_softmax(logits))
                answer_ids, logp = along[key]
                gap = divergence_gap(logp, answer_ids,
                                     tok(row["tuned"], add_special_tokens=False)["input_ids"],
                                     tok.eos_token_id)
            row["changed_at_tie"], row["divergence_gap"] = changed_at_tie(row["changed"], gap), gap
        beyond = sum(r["changed"] and not r["changed_at_tie"] for r in rows)
        result["drift"]["changed_beyond_ties"] = beyond / len(rows)
        result["drift"]["tie_margin"] = TIE_MARGIN
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({"name": name, "changed": sum(r["changed"] for r in rows),
                          "beyond_ties": beyond, "n_prompts": len(rows),
                          "gaps": sorted(round(r["divergence_gap"], 3) for r in rows
                                         if r["divergence_gap"] is not None)}), flush=True)


def main() -> None:
    from edge_tune.adapters import open_engine
    from edge_tune.commands.eval import _targets
    from edge_tune.eval.drift import drift, drift_prompts
    from edge_tune.eval.held_out import run_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--scales", default="1,0.1,0.03,0.01,0.003,0.0001,0")
    ap.add_argument("--exact", action="store_true",
                    help="llama.cpp's F32 KV cache without flash attention (Engine exact)")
    ap.add_argument("--rescore", help="comma-separated benchmarks/forgetting.py result names: "
                    "add the tie-aware changed share to their saved answers, run nothing else")
    args = ap.parse_args()
    target, _ = _targets(args.run, None)
    tok = run_tokenizer(target.manifest, Path(target.base))
    engine = open_engine(target, n_ctx=512, logits_all=True, training_system=False,
                         exact=args.exact)
    rows = []
    if args.rescore:
        try:
            rescore(engine, tok, target.system_mode, args.rescore.split(","))
        finally:
            engine.close()
        return
    try:
        base = Side(engine, None)
        for scale in (float(s) for s in args.scales.split(",")):
            t0 = time.time()
            d = drift(base, Scaled(engine, "adapter", scale), tok, drift_prompts(), 64,
                      target.system_mode)
            rows.append({"scale": scale, "changed": round(d["changed_share"] * d["n_prompts"]),
                         "beyond_ties": round(d["changed_beyond_ties"] * d["n_prompts"]),
                         "tie_margin": d["tie_margin"],
                         "gaps": sorted(round(r["divergence_gap"], 3) for r in d["prompts"]
                                        if r["divergence_gap"] is not None),
                         "n_prompts": d["n_prompts"], "mean_kl": d["mean_kl"],
                         "seconds": round(time.time() - t0)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        engine.close()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"scale-{args.run.name}{'-exact' if args.exact else ''}.json"
    # rows of earlier calls on the same run name stay, unless measured again
    kept = json.loads(out.read_text())["rows"] if out.is_file() else []
    rows += [r for r in kept if r["scale"] not in {r2["scale"] for r2 in rows}]
    out.write_text(json.dumps({"run": args.run.name,
                               "rows": sorted(rows, key=lambda r: -r["scale"])}, indent=1)
                   + "\n")


if __name__ == "__main__":
    main()
