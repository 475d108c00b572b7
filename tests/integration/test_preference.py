"""Preference tuning (``train --method dpo|orpo``): the data formats, the losses against
hand-computed values, tiny-model runs that train, export and verify, resume, and one real DPO
run of the default model on the bundled pirate preference set (marked slow).

The loss definitions are TRL's (``DPOTrainer`` sigmoid loss, ``ORPOTrainer.odds_ratio_loss``);
the expected numbers below are computed by hand with :mod:`math` from those formulas.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from importlib import resources
from pathlib import Path

import pytest

from edge_tune import api
from edge_tune.config import build
from edge_tune.data.formats import job_record, read_records
from edge_tune.errors import EdgeTuneError
from edge_tune.events import Log, Metric
from tests.helpers.cli import assert_one_line_error, run_cli

PAIR_TEXT = {"prompt": "Hello?", "chosen": "Arr, matey! Ahoy.", "rejected": "Hello."}
PAIR_CHAT = {"prompt": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hi."},
                        {"role": "user", "content": "Name a colour."}],
             "chosen": [{"role": "assistant", "content": "Arr, red as a sunset!"}],
             "rejected": [{"role": "assistant", "content": "Red."}]}
PAIR_IMPLICIT = {"chosen": [{"role": "user", "content": "Q"},
                            {"role": "assistant", "content": "Arr, A"}],
                 "rejected": [{"role": "user", "content": "Q"},
                              {"role": "assistant", "content": "A"}]}
PAIR_OPENAI = {"input": {"messages": [{"role": "user", "content": "Q?"}]},
               "preferred_output": [{"role": "assistant", "content": "Arr, yes."}],
               "non_preferred_output": [{"role": "assistant", "content": "Yes."}]}


def _write(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


def _asset(name: str) -> Path:
    return Path(str(resources.files("edge_tune") / "assets" / name))


# ---- formats -------------------------------------------------------------------------------

@pytest.mark.parametrize("record, fmt", [(PAIR_TEXT, "preference"), (PAIR_CHAT, "preference"),
                                         (PAIR_IMPLICIT, "preference"),
                                         (PAIR_OPENAI, "openai_preference")])
def test_preference_formats_are_detected_as_a_prompt_and_two_answers(tmp_path, record, fmt):
    data = read_records(_write(tmp_path / "p.jsonl", record, record))
    assert data.format == fmt
    rec = data.records[0]
    chosen, rejected = rec.messages, rec.rejected
    assert chosen[:-1] == rejected[:-1]  # the shared prompt
    assert chosen[-1]["role"] == rejected[-1]["role"] == "assistant"
    assert chosen[-1]["content"].startswith("Arr") and not rejected[-1]["content"].startswith(
        "Arr")
    # an assistant turn inside the prompt is context: only the compared answers are trained
    assert all(m.get("weight") == 0 for m in chosen[:-1] if m["role"] == "assistant")
    assert job_record(rec)["rejected"] == rejected


@pytest.mark.parametrize("record, needles", [
    ({"prompt": "Q", "chosen": "A"}, ["p.jsonl:2", "missing field 'rejected'"]),
    ({"prompt": "Q", "chosen": "A", "rejected": "A"}, ["p.jsonl:2", "the same answer"]),
    ({"prompt": "Q", "chosen": [{"role": "user", "content": "A"}], "rejected": "B"},
     ["p.jsonl:2", "'chosen' must end with an assistant message"]),
    ({"prompt": "Q", "chosen": 3, "rejected": "B"},
     ["p.jsonl:2", "'chosen' must be text or a non-empty list of messages"]),
    ({"chosen": [{"role": "assistant", "content": "A"}],
      "rejected": [{"role": "assistant", "content": "B"}]},
     ["p.jsonl:2", "missing field 'prompt'"]),
    ({"input": {"messages": "Q"}, "preferred_output": [{"role": "assistant", "content": "A"}],
      "non_preferred_output": [{"role": "assistant", "content": "B"}]},
     ["p.jsonl:2", "'input.messages' must be"]),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
     ["p.jsonl:2", "record is OpenAI chat but this file is preference"]),
])
def test_bad_preference_records_are_one_line_with_file_and_line(tmp_path, record, needles):
    path = _write(tmp_path / "p.jsonl", PAIR_OPENAI if "input" in record else PAIR_TEXT, record)
    with pytest.raises(EdgeTuneError) as info:
        read_records(path)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_bundled_preference_set_is_read_whole():
    train = read_records(_asset("pref_demo.jsonl"))
    held = read_records(_asset("pref_demo_heldout.jsonl"))
    assert train.format == held.format == "preference"
    assert len(train.records) == 120 and len(held.records) == 20
    prompts = {r.messages[0]["content"] for r in train.records}
    assert not prompts & {r.messages[0]["content"] for r in held.records}  # really held back
    assert all(r.messages[-1]["content"].startswith("Arr, matey!") for r in train.records)
    assert not any(r.rejected[-1]["content"].startswith("Arr") for r in train.records)


def test_data_inspect_shows_both_sides_and_what_is_trained(tmp_path, tiny):
    from edge_tune.data.inspect import inspect_data

    path = _write(tmp_path / "p.jsonl", PAIR_CHAT, PAIR_TEXT)
    report = inspect_data(path, model=str(tiny), seq_len=256)
    assert report["format"] == "preference" and report["pairs"] == report["records"] == 2
    assert report["examples"] == 4  # a chosen and a rejected sequence per pair
    first = report["first_example"]
    trained = ["".join(side["text"][a:b] for a, b in side["spans"])
               for side in (first, first["rejected"])]
    # only the compared answers (and their end of turn) carry the loss: not the prompt,
    # not the earlier assistant turn "Hi."
    assert trained[0].startswith("Arr, red as a sunset!") and "Hi." not in trained[0]
    assert trained[1].startswith("Red.") and "Name a colour" not in trained[1]
    assert first["text"][:first["spans"][0][0]] == first["rejected"]["text"][
        :first["rejected"]["spans"][0][0]]  # the same prompt on both sides
    proc = run_cli("data", "inspect", str(path), "--model", str(tiny))
    assert proc.returncode == 0, proc.stderr
    for needle in ("preference pairs", "chosen: its answer", "rejected: its answer",
                   "\u27e6Arr, red as a sunset!", "\u27e6Red."):
        assert needle in proc.stdout, proc.stdout


# ---- the losses on hand-computed values ---------------------------------------------------

def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_loss_matches_the_formula_by_hand():
    import torch

    from edge_tune.training.preference_loss import dpo_loss

    pc, pr, rc, rr, beta = [-12.0, -30.5], [-15.0, -29.0], [-13.0, -31.0], [-14.0, -28.0], 0.1
    out = dpo_loss(*(torch.tensor(v) for v in (pc, pr, rc, rr)), beta)
    # -log σ(β[(πc − rc) − (πr − rr)]): pair 1: 0.1·(1 − (−1)) = 0.2; pair 2: 0.1·(0.5 + 1)
    expected = [-_logsigmoid(0.2), -_logsigmoid(0.15)]
    assert float(out.loss) == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.05], rel=1e-5)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, -0.1], rel=1e-5)
    margin, accuracy = out.stats()
    assert margin == pytest.approx((0.2 + 0.15) / 2, rel=1e-5) and accuracy == 1.0
    # no difference to the reference (the adapter's first step): log 2, margin 0
    same = dpo_loss(*(torch.tensor(v) for v in (pc, pr, pc, pr)), beta)
    assert float(same.loss) == pytest.approx(math.log(2), rel=1e-6) and same.stats()[0] == 0


def test_orpo_loss_matches_the_formula_by_hand():
    import torch

    from edge_tune.training.preference_loss import orpo_loss

    mc, mr, nll, lam = [-0.9, -2.0, -1e-4], [-1.2, -1.5, -3.0], 0.7, 0.1

    def log_odds(p):  # log(P / (1 − P)) with log P = p
        return p - math.log(1 - math.exp(p))

    ratios = [_logsigmoid(log_odds(c) - log_odds(r)) for c, r in zip(mc, mr)]
    out = orpo_loss(torch.tensor(mc, dtype=torch.float64), torch.tensor(mr, dtype=torch.float64),
                    torch.tensor(nll, dtype=torch.float64), lam)
    assert float(out.loss) == pytest.approx(nll - lam * sum(ratios) / 3, rel=1e-9)
    assert out.chosen_rewards.tolist() == pytest.approx([lam * x for x in mc])
    assert out.stats()[1] == pytest.approx(2 / 3)  # the second pair prefers the rejected one


# ---- tiny-model runs ----------------------------------------------------------------------

STEPS = 6


def _cfg(out, model, **kw):
    return build(None, data=str(_asset("pref_demo.jsonl")), out=str(out), model=str(model),
                 max_steps=STEPS, batch_size=2, seq_len=64, lr=2e-3, rank=4, alpha=8, seed=3,
                 val_split=0.05, backend="cpu", report_to="none", **kw)


def _train(cfg, **kw):
    """(result, metrics, log lines) of an in-process run."""
    metrics: list[Metric] = []
    logs: list[str] = []

    def on_event(event):
        if isinstance(event, Metric):
            metrics.append(event)
        elif isinstance(event, Log):
            logs.append(event.message)

    result = api.train(cfg, on_event, **kw)
    return result, metrics, logs


def _verified(logs: list[str]) -> bool:
    """train's own check ran and passed (llama.cpp computes what torch + PEFT trained)."""
    return any(line.startswith("verify:") and line.endswith("(ok)") for line in logs)


@pytest.fixture(scope="module")
def dpo_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "run"
    return out, *_train(_cfg(out, tiny, method="dpo", save_every=0))


@pytest.mark.slow
def test_tiny_dpo_trains_exports_and_verifies(dpo_run):
    out, result, metrics, logs = dpo_run
    train = [m for m in metrics if m.split == "train"]
    val = [m for m in metrics if m.split == "val"]
    assert len(train) == STEPS and val
    # the adapter starts as the reference (LoRA B = 0): loss log 2, margin 0
    assert train[0].loss == pytest.approx(math.log(2), abs=1e-3)
    assert train[0].reward_margin == pytest.approx(0, abs=1e-3)
    assert val[-1].reward_margin > 0 and val[-1].reward_accuracy is not None
    man = json.loads((out / "manifest.json").read_text())
    assert man["hyperparameters"]["method"] == "dpo" and man["hyperparameters"]["beta"] == 0.1
    assert man["data"]["format"] == "preference"
    assert (out / "adapter.gguf").is_file()
    assert _verified(logs), logs


@pytest.mark.slow
def test_tiny_orpo_trains_exports_and_verifies(tiny, tmp_path):
    out = tmp_path / "run"
    result, metrics, logs = _train(_cfg(out, tiny, method="orpo", beta=0.2))
    train = [m for m in metrics if m.split == "train"]
    assert len(train) == STEPS and all(m.reward_margin is not None for m in train)
    assert all(math.isfinite(m.loss) and m.loss > 0 for m in train)
    man = json.loads((out / "manifest.json").read_text())
    assert man["hyperparameters"]["method"] == "orpo" and man["hyperparameters"]["beta"] == 0.2
    assert (out / "adapter.gguf").is_file() and _verified(logs), logs


@pytest.mark.slow
def test_a_cancelled_dpo_run_resumes_to_the_same_adapter(dpo_run, tiny, tmp_path):
    import torch
    from safetensors.torch import load_file

    straight = dpo_run[0]
    out = tmp_path / "run"
    cancel = threading.Event()

    def on_event(event):
        if isinstance(event, Metric) and event.split == "train" and event.step == 3:
            cancel.set()

    with pytest.raises(EdgeTuneError) as info:
        api.train(_cfg(out, tiny, method="dpo", save_every=0), on_event, cancel=cancel)
    assert info.value.exit_code == 130
    state = api.resume_state(out)
    assert state is not None and 3 <= state["step"] < STEPS
    result, metrics, logs = _train(None, resume=out)
    assert result.manifest.hyperparameters.to_dict()["method"] == "dpo"
    assert [m.step for m in metrics if m.split == "train"][0] == state["step"] + 1
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_method_and_data_must_match_in_one_line(tmp_path, demo_jsonl):
    pref = _write(tmp_path / "p.jsonl", PAIR_TEXT)
    proc = run_cli("train", "--data", str(demo_jsonl), "--method", "dpo", "--backend", "cpu")
    assert_one_line_error(proc, "--method dpo needs preference data", "prompt")
    proc = run_cli("train", "--data", str(pref), "--backend", "cpu")
    assert_one_line_error(proc, "p.jsonl", "preference data", "--method dpo")
    proc = run_cli("train", "--data", str(pref), "--method", "orpo", "--full")
    assert_one_line_error(proc, "--method orpo", "not with --full")
    proc = run_cli("train", "--data", str(pref), "--method", "kto")
    assert_one_line_error(proc, "--method kto", "unpaired answers", "--method dpo")


def test_planner_counts_two_sequences_and_the_reference_pass():
    from edge_tune import planner

    shape = planner.ModelShape(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64,
                               ffn=1536, vocab=49152)  # the default model
    machine = planner.Machine(budget_bytes=8 * planner.GIB, physical_cores=2, cpu_bf16=True)
    cfg = build(None, data="x.jsonl")
    sft = planner.estimate(shape, "cpu", cfg, machine)
    dpo = planner.estimate(shape, "cpu", dataclasses.replace(cfg, method="dpo"), machine)
    orpo = planner.estimate(shape, "cpu", dataclasses.replace(cfg, method="orpo"), machine)
    assert dpo.tokens_per_step == orpo.tokens_per_step == 2 * sft.tokens_per_step
    assert dpo.seconds_per_step > orpo.seconds_per_step > sft.seconds_per_step
    assert dpo.parts["activations"] > sft.parts["activations"]


# ---- the real default model -----------------------------------------------------------------

#: A few steps of DPO on the bundled set: every chosen answer starts "Arr, matey!", no rejected
#: one does (the same answer in plain words).
REAL_ARGS = ("--max-steps", "8", "--batch-size", "4", "--seq-len", "128", "--seed", "0",
             "--backend", "cpu", "--report-to", "none")
HELD_PAIRS = 10


@pytest.mark.slow
@pytest.mark.parametrize("method, accuracy", [("dpo", 0.8), ("orpo", 0.0)])
def test_real_run_prefers_the_chosen_style_on_held_back_pairs(tmp_path, hf_dir, method,
                                                              accuracy):
    """``accuracy``: the share of held-back pairs the tuned model must rank right (ORPO's
    margin grows as much on every pair, from far below zero, but stays near zero in 8 steps)."""
    from edge_tune.eval.preference import preference_margins

    out = tmp_path / method
    proc = run_cli("train", "--data", str(_asset("pref_demo.jsonl")), "--method", method,
                   "--out", str(out), *REAL_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verify:" in proc.stderr and "(ok)" in proc.stderr  # llama.cpp computes as trained
    held = _asset("pref_demo_heldout.jsonl")
    margins = preference_margins(out, held, HELD_PAIRS)
    print(f"held-out margin (nats): base {margins.base_mean:.2f} -> tuned "
          f"{margins.tuned_mean:.2f}; grew on {margins.improved:.0%}, tuned accuracy "
          f"{margins.tuned_accuracy:.0%}")
    assert margins.tuned_mean > margins.base_mean + 5
    assert margins.improved >= 0.9 and margins.tuned_accuracy >= accuracy
    # chat shows it: held-back questions answered in the preferred (pirate) style
    questions = [r.messages[0]["content"] for r in read_records(held).records[:3]]
    answers = []
    for question in questions:
        chat = run_cli("chat", "--adapter", str(out), "--prompt", question, "--temperature",
                       "0", "--max-tokens", "24")
        assert chat.returncode == 0, chat.stderr[-2000:]
        answers.append(chat.stdout.strip())
    print(answers)
    assert sum(a.lower().startswith("arr") for a in answers) >= 2, answers


def test_the_tracker_records_reward_margin_and_accuracy(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from edge_tune import tracking

    tracker = tracking.Tracker("tensorboard", tmp_path, {}, lambda e: None)
    sink = tracker.sink(lambda e: None)
    sink(Metric(1, 2, 0.6, reward_margin=0.1, reward_accuracy=0.5))
    sink(Metric(2, 2, 0.5, split="val", reward_margin=0.2, reward_accuracy=1.0))
    tracker.close([0.6, 0.5])
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/reward_margin", "train/reward_accuracy", "val/reward_margin",
            "val/reward_accuracy"} <= set(events.Tags()["scalars"])
    assert events.Scalars("val/reward_margin")[0].value == pytest.approx(0.2)
