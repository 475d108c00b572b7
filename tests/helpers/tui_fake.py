"""A stand-in for ``edge_tune.api`` with fixed answers, for the TUI's snapshot tests only:
real hardware, timings and sampled text would change every picture. The pilot tests use the
real core. It has the functions of the TUI's core Protocol (``edge_tune.tui.core.Core``), with
the same parameters and result types (``tests/tui/test_tui_core_protocol.py``)."""

from __future__ import annotations

import json
from pathlib import Path

from edge_tune.api import ChatTarget, EvalResult, ExportResult, TrainResult
from edge_tune.errors import EdgeTuneError
from edge_tune.events import Done, Log, Metric, Progress
from edge_tune.manifest import Manifest
from edge_tune.verify import VerifyReport

HERE = Path(__file__).parent / "tui_fixtures"
RUNS = [
    {"path": "runs/pirate-r16", "name": "pirate-r16", "status": "done",
     "created": "2026-11-22T09:30:00+00:00", "step": 50, "total": 50, "final_loss": 0.412,
     "val_loss": 0.538, "tokens_per_second": 251.0, "train_seconds": 182.0,
     "base": "SmolLM2-135M-Instruct", "data": "edge_tune/assets/demo.jsonl",
     "adapter_gguf": "runs/pirate-r16/adapter.gguf",
     "hyperparameters": {"rank": 16, "alpha": 32.0, "lr": 0.001, "batch_size": 8,
                         "seq_len": 512}},
    {"path": "runs/pirate-r8", "name": "pirate-r8", "status": "cancelled", "created": None,
     "step": 12, "total": 50, "final_loss": 1.104, "val_loss": None, "tokens_per_second": None,
     "train_seconds": 40.0, "base": None, "data": "edge_tune/assets/demo.jsonl",
     "adapter_gguf": None,
     "hyperparameters": {"rank": 8, "alpha": 16.0, "lr": 0.001, "batch_size": 8,
                         "seq_len": 512}},
]
# a loss curve that looks like a run: falls fast, then flattens
LOSSES = [2.91, 2.64, 2.18, 1.83, 1.52, 1.31, 1.12, 0.98, 0.87, 0.79, 0.73, 0.69, 0.66, 0.63,
          0.61, 0.6, 0.58, 0.57, 0.56, 0.55]


def fake_plan(cfg) -> dict:
    return {"fits": True, "summary": "plan: peak ~2.13 GiB of 17.0 GiB budget (cpu, bf16); "
                                     "~5.6s/step, ~5 min for 50 steps"}


ANSWERS = {None: "The capital of Japan is Tokyo.",
           "adapter": "Arr, matey! Tokyo be the capital of Japan, a grand port!"}


class FakeEngine:
    def __init__(self) -> None:
        self.active = "adapter"

    def activate(self, name) -> None:
        self.active = name

    @property
    def active_mix(self) -> tuple:
        return () if self.active is None else ((self.active, 1.0),)

    def activate_mix(self, mix) -> None:
        self.active = mix[0][0] if mix else None

    def template_of(self, adapter):
        return "{{ messages }}"

    def chat_stream(self, messages, temperature=0.7, max_tokens=256, seed=None,
                    plain_fallback=False, split_reasoning=False):
        from edge_tune.llama.engine import Piece

        for word in ANSWERS[self.active].split(" "):
            yield Piece(word + " ") if split_reasoning else word + " "

    def close(self) -> None:
        pass


class FakeCore:
    def doctor(self) -> dict:
        return json.loads((HERE / "doctor_report.json").read_text())

    def inspect_data(self, path, model="default", seq_len=512, fmt="auto", on_event=None,
                     chat_template=None):
        return json.loads((HERE / "inspect_report.json").read_text())

    def model_template(self, model):
        return {"known": True, "has": True, "name": "chatml", "builtin": "chatml, llama3"}

    def bad_records(self, path, fmt="auto"):
        return []

    def list_runs(self, root):
        return [dict(r) for r in RUNS]

    def resume_state(self, run_dir):
        return {"step": 12, "total": 50, "checkpoint": True} if "r8" in str(run_dir) else None

    def default_run_dir(self) -> Path:
        return Path("runs/run-20261122-093000")

    def plan(self, cfg) -> dict:
        return fake_plan(cfg)

    def train(self, cfg, on_event, cancel=None, resume=None) -> TrainResult:
        on_event(Log("edge_tune/assets/demo.jsonl: 200 records, format openai"))
        on_event(Log("backend: cpu (the fastest backend available on this machine)"))
        on_event(Progress("load", 0, None, "", "loading base model"))
        total = len(LOSSES)
        for step, loss in enumerate(LOSSES, 1):
            on_event(Metric(step=step, total_steps=total, loss=loss, tokens_per_second=251.0,
                            eta_seconds=3.6 * (total - step), learning_rate=1e-3))
            if step % 5 == 0:
                on_event(Metric(step=step, total_steps=total, loss=loss + 0.12, split="val"))
        on_event(Done("train", {"run_dir": "runs/pirate-r16"}))
        return TrainResult(Path("runs/pirate-r16"), Manifest.from_dict({"result": {
            "steps": total, "final_loss": 0.553, "tokens_per_second": 251.0}}))

    def export(self, adapter, out=None, outtype="f32", merge=False, quant=None, ollama=None,
               on_event=None) -> ExportResult:
        on_event(Log(f"wrote {adapter}/adapter.gguf (210 LoRA pairs, rank 16, alpha 32)"))
        return ExportResult("adapter", Path(adapter) / "adapter.gguf", quant=outtype.upper(),
                            rank=16, alpha=32.0)

    def verify(self, run, on_event=None, **kw):
        return VerifyReport(effect_rel_err=3.1e-3, top1=1.0, kl=0.0004, n_prompts=3,
                            n_positions=96, checked="adapter")

    def evaluate(self, run, data=None, on_event=None) -> EvalResult:
        scores = {"rouge_l": 0.41, "exact": 0.0, "contains": 0.2}
        return EvalResult(
            run=str(run), base="SmolLM2-135M-Instruct.Q4_1.gguf", tuned=f"{run}/adapter.gguf",
            data=str(data or f"{run}/val.jsonl"), n_records=20, n_examples=20, n_tokens=1840,
            loss={"base": 2.31, "tuned": 0.71}, perplexity={"base": 10.07, "tuned": 2.03},
            scores={"base": scores, "tuned": dict(scores, rouge_l=0.78, exact=0.35,
                                                  contains=0.85)},
            n_answers=20, max_tokens=64,
            drift={"mean_kl": 0.0412, "changed_share": 0.25, "n_prompts": 8,
                   "n_positions": 512})

    def bundle(self, runs, out, on_event=None, **kw) -> Path:
        return Path(out)

    def delete_run(self, run_dir):
        raise EdgeTuneError(f"{run_dir}: the snapshot core deletes nothing")

    def resolve_chat(self, adapter, base) -> ChatTarget:
        return ChatTarget(Path("SmolLM2-135M-Instruct.Q4_1.gguf"),
                          Path(adapter) / "adapter.gguf" if adapter else None, None)

    def open_engine(self, target, on_event=None, **kw):
        return FakeEngine()
