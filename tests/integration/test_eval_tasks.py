"""``edge-tune eval RUN --tasks``: lm-evaluation-harness tasks in local files, base and tuned
side by side, on the llama.cpp engine. The base's accuracy is checked against the task
scored by hand from :meth:`Engine.logits` (lm-eval's own HF backend agrees with the engine:
tests/integration/test_server_scoring.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.helpers.cli import assert_one_line_error, run_cli, run_cli_in_process
from tests.helpers.tiny_runs import make_tiny_runs

pytest.importorskip("llama_cpp")
pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed "
                                      "(pip install 'edge-tune[test]')")

TASKS = Path(__file__).resolve().parents[1] / "data" / "lm_eval"


@pytest.fixture(scope="module")
def runs(default_gguf, tmp_path_factory) -> dict:
    return make_tiny_runs(tmp_path_factory.mktemp("tasks"), default_gguf)


def _accuracy(gguf: Path, adapter: Path | None) -> float:
    """The task's accuracy by hand: the choice with the highest summed logprob after the
    question (as lm-eval asks it: the target delimiter, a space, goes with the choice)."""
    from edge_tune.llama.engine import Engine

    docs = [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").read_text().splitlines()]
    right = 0
    with Engine(gguf, n_ctx=256, logits_all=True) as eng:
        if adapter is not None:
            eng.activate(eng.add_adapter(adapter, "a"))
        for doc in docs:
            scores = []
            for choice in doc["choices"]:
                ctx = eng.tokenize(doc["question"])
                ids = eng.tokenize(doc["question"] + " " + choice)
                x = eng.logits(ids).astype(np.float64)
                m = x.max(axis=1, keepdims=True)
                lp = x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
                scores.append(sum(lp[i - 1, ids[i]] for i in range(len(ctx), len(ids))))
            right += int(np.argmax(scores) == doc["answer"])
    return right / len(docs)


def test_eval_tasks_base_and_tuned(runs, monkeypatch):
    proc = run_cli("eval", str(runs["lora"]), "--tasks", str(TASKS), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    row = report["tasks"]["edge_tune_tiny_mc"]
    assert row["n"] == 6 and row["higher_is_better"]["acc"] is True
    assert row["base"]["acc"] == pytest.approx(_accuracy(runs["base"], None))
    assert row["tuned"]["acc"] == pytest.approx(
        _accuracy(runs["base"], runs["lora"] / "adapter.gguf"))
    assert report["source"] == str(TASKS)
    # the table, with --limit (in this process: lm-eval is imported already)
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    proc = run_cli_in_process("eval", str(runs["lora"]), "--tasks",
                              str(TASKS / "tiny_mc.yaml"), "--limit", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "edge_tune_tiny_mc" in proc.stdout and "acc" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_eval_tasks_bad_input(runs, tmp_path, monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    run = str(runs["lora"])
    assert_one_line_error(run_cli_in_process("eval", run, "--tasks", str(tmp_path / "no")),
                          "no such file or folder")
    assert_one_line_error(run_cli_in_process("eval", run, "--tasks", str(TASKS), "--data",
                                             str(TASKS / "tiny_mc.jsonl")), "--data")
    assert_one_line_error(run_cli_in_process("eval", run, "--limit", "3"), "--tasks")
    group = tmp_path / "group.yaml"
    group.write_text("group: mine\ntask:\n  - a\n  - b\n")
    assert_one_line_error(run_cli_in_process("eval", run, "--tasks", str(group)),
                          "groups are not supported")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "t.yaml").write_text((TASKS / "tiny_mc.yaml").read_text().replace(
        "{{question}}", "{{nosuch.field}}").replace(
        "test: tiny_mc.jsonl", f"test: {TASKS / 'tiny_mc.jsonl'}"))
    proc = run_cli_in_process("eval", run, "--tasks", str(bad))  # found while running:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # after the progress lines
    assert proc.stderr.splitlines()[-1].startswith("error: a task's template does not fit")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli_in_process("eval", run, "--tasks", str(tmp_path / "empty")),
                          "no *.yaml task file")
