"""`train --replay N`: the base's own answers to shipped general prompts mixed into training
(edge_tune/replay.py), its validation, and eval's hint when drift is high. The measured effect
on a narrow task is a benchmark (benchmarks/forgetting.py, docs/eval.md), not a test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.cli import assert_one_line_error, run_cli_in_process


@pytest.fixture
def replay_cache(tmp_path, monkeypatch) -> Path:
    """The replay answers' cache file, in this test's folder (the user cache stays as it is)."""
    from edge_tune import replay

    path = tmp_path / "replay-cache.json"
    monkeypatch.setattr(replay, "_cache_path", lambda *a: path)
    return path


def _data(tmp_path: Path, n: int = 8) -> Path:
    path = tmp_path / "narrow.jsonl"
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Ticket {i}: my order {i} is late."},
        {"role": "assistant", "content": json.dumps({"category": "shipping", "id": i})}]}) + "\n"
        for i in range(n)))
    return path


def test_bad_replay_values_are_one_line_errors(tmp_path):
    data = str(_data(tmp_path))
    assert_one_line_error(run_cli_in_process("train", "--data", data, "--replay", "61"),
                          "replay: 61", "at most 60")
    assert_one_line_error(run_cli_in_process("train", "--data", data, "--replay", "-1"),
                          "replay: -1", "integer >= 0")
    assert_one_line_error(run_cli_in_process("train", "--data", data, "--replay", "2",
                                             "--method", "dpo"), "--replay", "--method dpo")
    toml = tmp_path / "run.toml"
    toml.write_text(f'data = "{data}"\nreplay = "many"\n')
    assert_one_line_error(run_cli_in_process("train", "--config", str(toml)), "replay")


def test_the_replay_prompts_are_not_the_drift_prompts():
    from edge_tune.eval.drift import drift_prompts
    from edge_tune.replay import max_replay, replay_prompts

    prompts = replay_prompts()
    assert len(prompts) == len(set(prompts)) == max_replay() == 60
    assert not set(prompts) & set(drift_prompts())  # eval's drift check stays unseen


def test_replay_answers_are_the_base_models_own_and_cached(default_gguf, replay_cache, tmp_path):
    from edge_tune.llama.engine import Engine
    from edge_tune.fsutil import sha256_file
    from edge_tune.replay import MAX_TOKENS, replay_prompts, replay_records

    sha = sha256_file(default_gguf)
    records = replay_records(default_gguf, 2, sha)
    assert [r["messages"][0]["content"] for r in records] == replay_prompts()[:2]
    with Engine(default_gguf, n_ctx=1024, prompt_cache=False) as engine:
        own = engine.chat([{"role": "user", "content": replay_prompts()[0]}], temperature=0.0,
                          max_tokens=MAX_TOKENS).strip()
    assert records[0]["messages"][1] == {"role": "assistant", "content": own}
    assert records[0]["where"].startswith("replay prompt 1")
    # the second time nothing is generated: a base that does not exist is never opened
    assert replay_records(tmp_path / "gone.gguf", 2, sha) == records
    assert set(json.loads(replay_cache.read_text())) == set(replay_prompts()[:2])


def test_replay_records_reach_the_training_job(tiny, replay_cache, tmp_path):
    """The tiny random model never ends an answer, so its cache is seeded here: what is tested
    is that the records train (counted by the worker) and are recorded and said."""
    from edge_tune import api
    from edge_tune.config import build
    from edge_tune.events import Log
    from edge_tune.replay import replay_prompts

    replay_cache.write_text(json.dumps({p: f"General answer {i}." for i, p in
                                        enumerate(replay_prompts()[:3])}))
    logs: list[str] = []
    cfg = build(None, data=str(_data(tmp_path)), out=str(tmp_path / "run"), model=str(tiny),
                max_steps=2, batch_size=4, seq_len=64, rank=2, alpha=4, verify=False,
                report_to="none", replay=3)
    run = api.train(cfg, lambda e: logs.append(e.message) if isinstance(e, Log) else None)
    man = json.loads((run.run_dir / "manifest.json").read_text())
    assert man["data"]["records"] == 8 and man["data"]["examples"] == 8 + 3
    assert man["data"]["replay"]["records"] == 3 and man["hyperparameters"]["replay"] == 3
    said = [m for m in logs if m.startswith("replay: ")]
    assert said and "3 general records" in said[0] and "8 training records" in said[0]


def test_eval_says_what_to_do_when_drift_is_high():
    from edge_tune.eval.drift import drift_hint

    from edge_tune.eval.drift import task_like

    refs = ['{"category": "billing", "urgency": "high", "customer": "Ada"}']
    rows = [{"base": "Paris is the capital of France.",  # the task took this prompt over
             "tuned": '{"category": "bug", "urgency": "high", "customer": "Paris"}'},
            {"base": "Paris.", "tuned": "The capital of France is Paris."}]
    assert task_like(rows, refs) == 1
    high = {"changed_share": 1.0, "n_prompts": 20, "mean_kl": 0.3, "task_like": 9}
    hint = drift_hint(high)
    assert "9 of 20" in hint and "--replay 40" in hint and "--lr" in hint and \
        "--target-modules" in hint and "docs/eval.md" in hint and "\n" not in hint
    assert "larger --replay (this run used 20" in drift_hint(high, replay=20)
    assert drift_hint({**high, "task_like": 0, "mean_kl": 0.77}) is not None  # KL alone
    # every greedy answer changed, yet none reads like the task and the KL is low: no hint
    assert drift_hint({**high, "task_like": 1, "mean_kl": 0.32}) is None
    assert drift_hint({"changed_share": 0.0, "n_prompts": 0, "mean_kl": 0.0}) is None


def test_the_hint_is_shown_by_the_cli_report_and_the_tui_summary():
    import io

    from rich.console import Console

    from edge_tune.commands.eval import EvalResult
    from edge_tune.eval.drift import drift_hint
    from edge_tune.render.eval import render_eval
    from edge_tune.tui.screens.adapters import eval_lines

    drift = {"mean_kl": 4.2, "changed_share": 1.0, "n_prompts": 20, "n_positions": 900,
             "prompts": [], "task_like": 19}
    drift["hint"] = drift_hint(drift)
    scores = {"exact": 0.0, "contains": 0.0, "rouge_l": 0.1, "json_valid": None}
    report = EvalResult(run="r", base="b.gguf", tuned="a.gguf", data="--data x", n_records=2,
                        n_examples=2, n_tokens=40, loss={"base": 2.0, "tuned": 1.0},
                        perplexity={"base": 7.4, "tuned": 2.7},
                        scores={"base": scores, "tuned": scores}, n_answers=0, max_tokens=8,
                        drift=drift).to_dict()
    console = Console(file=io.StringIO(), width=400, no_color=True)
    render_eval(report, console)
    assert drift["hint"] in console.file.getvalue()
    assert any(drift["hint"] in line for line in eval_lines(report))


def test_plan_counts_the_replay_records(tiny, demo_jsonl):
    """``plan --replay N`` plans for the N records train will mix in (their answers are not
    written yet: planned at the longest length kept)."""
    from edge_tune import api
    from edge_tune.config import build

    plain = api.plan(build(data=str(demo_jsonl), model=str(tiny)))
    mixed = api.plan(build(data=str(demo_jsonl), model=str(tiny), replay=10))
    assert mixed["records"] == plain["records"] + 10
