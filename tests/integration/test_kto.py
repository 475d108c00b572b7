"""KTO (``train --method kto``) and the feedback loop that feeds it.

* The data: TRL's ``prompt``/``completion``/``label`` and LLaMA-Factory's ``kto_tag`` read into
  KTO examples (the answer trained, the prompt not), their KL rows, what is refused.
* The loss against the KTO paper's formula by hand (TRL's ``KTOTrainer`` against the CPU
  backend: test_unsloth_mapping_kto.py; mlx against the CPU backend: test_preference_mlx.py).
* ``serve --feedback FILE``: ``POST /v1/feedback`` with the official ``openai`` client and a
  plain HTTP call, for plain and streamed answers; the file it writes trains.
* A tiny run on a small thumbs file (unpaired answers from the bundled pirate set) moves the
  held-out preference margin the right way, measured in llama.cpp on what ships.
"""

from __future__ import annotations

import dataclasses
import json
import math
from importlib import resources
from pathlib import Path

import pytest
from tests.helpers.cli import assert_one_line_error, run_cli

from edge_tune.config import build
from edge_tune.data.formats import job_record, read_records
from edge_tune.data.template import IGNORE

Q = "What is the capital of France?"


def _asset(name: str) -> Path:
    return Path(str(resources.files("edge_tune") / "assets" / name))


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def thumbs(path: Path, n: int) -> Path:
    """A thumbs file from the bundled preference set, unpaired: the even pairs give their
    chosen (pirate) answer marked good, the odd ones their rejected (plain) answer marked
    bad."""
    pairs = [json.loads(line) for line in _asset("pref_demo.jsonl").read_text().splitlines()]
    return _jsonl(path, [{"prompt": p["prompt"], "completion": p["chosen"], "label": True}
                         if i % 2 == 0 else
                         {"prompt": p["prompt"], "completion": p["rejected"], "label": False}
                         for i, p in enumerate(pairs[:n])])


@pytest.fixture(scope="module")
def tok(tiny_hf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_hf))


# ---- data ------------------------------------------------------------------------------------

KTO_TRL = [{"prompt": Q, "completion": "Paris.", "label": True},
           {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                       {"role": "user", "content": Q}],
            "completion": [{"role": "assistant", "content": "Rome."}], "label": False}]
KTO_TAG = [{"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": "Paris."}],
            "kto_tag": True},
           {"instruction": Q, "output": "Rome.", "kto_tag": False}]


@pytest.mark.parametrize("records", [KTO_TRL, KTO_TAG[:1]], ids=["trl", "llamafactory"])
def test_kto_records_become_examples_with_only_the_answer_trained(tmp_path, tok, records):
    from edge_tune.data.preference import KTOExample
    from edge_tune.training.worker import tokenize_records

    read = read_records(_jsonl(tmp_path / "k.jsonl", records))
    examples = tokenize_records(tok, [job_record(r) for r in read.records], 256, lambda e: None,
                                "training", kto=True)
    assert [type(e) for e in examples] == [KTOExample] * len(records)
    assert [e.desirable for e in examples] == [r.get("label", r.get("kto_tag")) for r in records]
    for ex, rec in zip(examples, read.records):
        trained = tok.decode([t for t in ex.labels if t != IGNORE])
        assert trained.startswith(rec.messages[-1]["content"])  # the answer (+ end of turn)
        assert all(t == IGNORE for t in ex.labels[:ex.prompt_len])
        assert ex.labels[ex.prompt_len] != IGNORE
    if len(examples) == 2:  # an earlier assistant turn is context, not the answer
        assert "Hey" not in tok.decode([t for t in examples[1].labels if t != IGNORE])


def test_method_kto_and_the_data_must_match_in_one_line(tmp_path):
    pairs = _jsonl(tmp_path / "p.jsonl", [{"prompt": Q, "chosen": "Paris.", "rejected": "Rome."}])
    proc = run_cli("plan", "--data", str(pairs), "--method", "kto")
    assert_one_line_error(proc, "--method kto", "unpaired answers", "--method dpo")
    mixed = _jsonl(tmp_path / "m.jsonl", [KTO_TRL[0], {"prompt": Q, "completion": "Paris."}])
    proc = run_cli("plan", "--data", str(mixed), "--method", "kto")
    assert_one_line_error(proc, "m.jsonl:2", "--method kto needs every record marked")
    proc = run_cli("plan", "--data", str(mixed), "--method", "kto", "--batch-size", "1")
    assert_one_line_error(proc, "--batch-size 1", "KL estimate")
    kto = _jsonl(tmp_path / "k.jsonl", KTO_TRL)
    proc = run_cli("plan", "--data", str(kto), "--method", "dpo")
    assert_one_line_error(proc, "KTO data", "--method kto")


def test_kto_loss_matches_the_formula_by_hand():
    import torch

    from edge_tune.training.preference_loss import kto_loss

    policy, ref = torch.tensor([-10.0, -12.0, -9.0]), torch.tensor([-11.0, -11.0, -11.0])
    policy_kl, ref_kl = torch.tensor([-20.0, -21.0, -19.0]), torch.tensor([-20.5, -21.0, -20.0])
    desirable = torch.tensor([True, False, False])
    beta, wd, wu = 0.5, 2.0, 0.5
    out = kto_loss(policy, ref, policy_kl, ref_kl, desirable, beta, wd, wu)
    z = max(0.0, (0.5 + 0.0 + 1.0) / 3)  # KL estimate: mean policy − reference on KL rows

    def sig(x):
        return 1 / (1 + math.exp(-x))

    want = [wd * (1 - sig(beta * (1.0 - z))),  # desirable, log ratio +1
            wu * (1 - sig(beta * (z - (-1.0)))),  # undesirable, log ratio −1
            wu * (1 - sig(beta * (z - 2.0)))]  # undesirable, log ratio +2: pushed down
    assert float(out.loss) == pytest.approx(sum(want) / 3, rel=1e-6)
    assert out.kl == pytest.approx(z)
    margin, right = out.stats()
    assert margin == pytest.approx(beta * 1.0 - beta * (-1.0 + 2.0) / 2)
    assert right == pytest.approx(2 / 3)  # the undesirable answer with a +2 ratio is wrong


def test_planner_counts_the_kl_rows_and_the_reference_pass():
    from edge_tune import planner

    shape = planner.ModelShape(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64,
                               ffn=1536, vocab=49152)
    machine = planner.Machine(budget_bytes=8 * planner.GIB, physical_cores=2, cpu_bf16=True)
    cfg = build(None, data="x.jsonl")
    sft, dpo, orpo, kto = (planner.estimate(shape, "cpu", dataclasses.replace(cfg, method=m),
                                            machine) for m in ("sft", "dpo", "orpo", "kto"))
    assert kto.tokens_per_step == 2 * sft.tokens_per_step  # the examples and their KL rows
    # DPO: backward on both rows + reference; KTO: backward on half of them + reference
    assert dpo.seconds_per_step > kto.seconds_per_step > orpo.seconds_per_step


# ---- the feedback loop -------------------------------------------------------------------------

def test_feedback_route_writes_kto_records_that_train(tiny, tmp_path):
    import httpx
    import openai
    from tests.helpers.serve_helpers import http_json, one_llama_thread, running_server

    from edge_tune import api
    from edge_tune.feedback import AnswerLog

    feedback = tmp_path / "thumbs" / "feedback.jsonl"
    with one_llama_thread(), running_server("--base", str(tiny), "--ctx", "512",
                                            "--feedback", str(feedback)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        chats = [[{"role": "user", "content": Q}],
                 [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Name a fruit."}]]
        first = client.chat.completions.create(model="base", messages=chats[0], max_tokens=6,
                                               temperature=0)
        stream = client.chat.completions.create(model="base", messages=chats[1],
                                                max_tokens=6, temperature=0, stream=True)
        parts = list(stream)
        streamed_id = parts[0].id
        streamed_text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
        # the official client's own helper for routes it has no method for
        said = client.post("/feedback", body={"id": first.id, "label": True},
                           cast_to=httpx.Response).json()
        assert said == {"object": "feedback", "id": first.id, "label": True,
                        "recorded": str(feedback)}
        # a plain HTTP call, with a comment
        body = json.dumps({"id": streamed_id, "label": False, "comment": "too vague"}).encode()
        status, out = http_json("POST", server.url + "/v1/feedback", body,
                                {"Content-Type": "application/json"})
        assert status == 200 and out["label"] is False
        # judged once; unknown ids and bad labels are OpenAI-style errors
        assert http_json("POST", server.url + "/v1/feedback", body)[0] == 409
        for bad, code, needle in (({"id": "chatcmpl-nope", "label": True}, 404, "no answer"),
                                  ({"id": first.id, "label": "yes"}, 400, "'label'"),
                                  ({"label": True}, 400, "'id'")):
            status, err = http_json("POST", server.url + "/v1/feedback",
                                    json.dumps(bad).encode())
            assert status == code and needle in err["error"]["message"], err
        with pytest.raises(openai.NotFoundError):
            client.post("/feedback", body={"id": "chatcmpl-x", "label": True},
                        cast_to=httpx.Response)
    records = [json.loads(line) for line in feedback.read_text().splitlines()]
    assert records == [
        {"prompt": chats[0], "completion": [{"role": "assistant",
                                             "content": first.choices[0].message.content}],
         "label": True, "model": "base"},
        {"prompt": chats[1], "completion": [{"role": "assistant", "content": streamed_text}],
         "label": False, "comment": "too vague", "model": "base"}]
    read = read_records(feedback)
    assert read.format == "completion" and read.kto == (1, 1) and not read.ignored
    # what the route wrote is what train --method kto reads: a few steps on it
    cfg = build(None, data=str(feedback), out=str(tmp_path / "run"), model=str(tiny),
                method="kto", max_steps=2, batch_size=2, seq_len=64, rank=4, alpha=8,
                backend="cpu", report_to="none", verify=False)
    result = api.train(cfg, lambda e: None)
    assert result.manifest.result.steps == 2 and (tmp_path / "run" / "adapter.gguf").is_file()
    # the store is bounded by count and by age
    now = [0.0]
    log = AnswerLog(tmp_path / "x.jsonl", keep=2, seconds=10, clock=lambda: now[0])
    for i in range(3):
        log.remember(f"id{i}", chats[0], {"content": "a"})
    with pytest.raises(KeyError):
        log.judge("id0", True)
    now[0] = 11
    with pytest.raises(KeyError):
        log.judge("id2", True)


def test_chat_marks_the_last_answer_with_good_and_bad(tiny, tmp_path):
    import os
    import subprocess
    import sys

    feedback = tmp_path / "chat-feedback.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "edge_tune", "chat", "--base", str(tiny), "--temperature", "0",
         "--max-tokens", "6", "--system", "Be brief.", "--feedback", str(feedback)],
        input="/good\nHi there\n/bad too short\n/good\n", capture_output=True, text=True,
        timeout=300, cwd=tmp_path, env=dict(os.environ, EDGE_TUNE_THREADS="1", COLUMNS="200"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no answer to mark yet" in proc.stderr  # /good before any answer
    assert "marked the last answer bad" in proc.stderr
    assert "already marked" in proc.stderr  # one verdict per answer
    [record] = [json.loads(line) for line in feedback.read_text().splitlines()]
    assert record["prompt"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hi there"}]
    assert record["label"] is False and record["comment"] == "too short"
    assert record["model"] == "base"
    assert read_records(feedback).kto == (0, 1)


# ---- a run moves the held-out preference ------------------------------------------------------

def test_a_small_thumbs_file_moves_the_held_out_preference(tiny, tmp_path):
    """Unpaired thumbs (pirate answers up, plain ones down) on the tiny model: the held-out
    pairs' margin log P(pirate) − log P(plain), in llama.cpp on the exported adapter, grows."""
    from edge_tune import api
    from edge_tune.eval.preference import preference_margins
    from edge_tune.events import Metric

    out = tmp_path / "run"
    cfg = build(None, data=str(thumbs(tmp_path / "thumbs.jsonl", 24)), out=str(out),
                model=str(tiny), method="kto", max_steps=10, batch_size=4, seq_len=64,
                lr=5e-3, rank=4, alpha=8, seed=3, backend="cpu", report_to="none",
                verify=False)
    metrics = []
    api.train(cfg, lambda e: metrics.append(e) if isinstance(e, Metric) else None)
    train = [m for m in metrics if m.split == "train"]
    assert train[0].loss == pytest.approx(0.5, abs=1e-3)  # adapter = reference: 1 − σ(0)
    assert train[-1].reward_margin > 0
    margins = preference_margins(out, _asset("pref_demo_heldout.jsonl"), 8)
    print(f"held-out margin (nats): base {margins.base_mean:.2f} -> tuned "
          f"{margins.tuned_mean:.2f}; grew on {margins.improved:.0%}")
    assert margins.tuned_mean > margins.base_mean + 1 and margins.improved >= 0.75
