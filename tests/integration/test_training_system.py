"""The system prompt every training record shared: recorded at train time (manifest
``data.system``), sent by ``chat`` and ``serve`` when a conversation has none (said once), and
never over a system message of the user's own. A tiny run laid out as ``train`` writes it
(tests/helpers/tiny_runs.py) on a tiny random model, through the real chat command and the real app."""

from __future__ import annotations

import json

import pytest
from tests.helpers.cli import run_cli_in_process

SYSTEM = "You are Captain Hook. Answer like a pirate."


@pytest.fixture(scope="module")
def run(tmp_path_factory, default_gguf):
    from tests.helpers.tiny_runs import make_tiny_runs

    runs = make_tiny_runs(tmp_path_factory.mktemp("system"), default_gguf)
    man = json.loads((runs["lora"] / "manifest.json").read_text())
    man["data"] = {"system": SYSTEM}
    (runs["lora"] / "manifest.json").write_text(json.dumps(man))
    return runs["lora"]


def test_shared_system_is_found_only_when_every_record_has_the_same(tmp_path):
    from edge_tune.data.formats import read_records
    from edge_tune.data.training import shared_system

    def records(*systems):
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps({"messages": ([{"role": "system", "content": s}]
                                                         if s else []) +
                                            [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "Arr"}]}) + "\n"
                                for s in systems))
        return read_records(path).records

    assert shared_system(records(SYSTEM, SYSTEM)) == SYSTEM
    assert shared_system(records(SYSTEM, "Another.")) is None
    assert shared_system(records(SYSTEM, None)) is None


def _chat(run, *extra):
    proc = run_cli_in_process("chat", "--adapter", str(run), "--prompt", "Who are you?",
                              "--temperature", "0", "--max-tokens", "6", *extra)
    notes = [line for line in proc.stderr.splitlines() if "training system prompt" in line]
    return proc, notes


def test_chat_sends_the_training_system_prompt_unless_given_one(run):
    default, notes = _chat(run)
    assert notes == [f"note: using the training system prompt: {SYSTEM!r} (override with "
                     "--system)"], default.stderr
    explicit, none_said = _chat(run, "--system", SYSTEM)
    assert none_said == []
    assert (default.returncode, default.stdout) == (explicit.returncode, explicit.stdout)


def test_serve_sends_it_when_a_request_has_no_system_message(run):
    from starlette.testclient import TestClient

    from edge_tune.commands.serve import open_serving, plan_serving
    from edge_tune.server.app import build_app
    from edge_tune.server.scheduler import Scheduler

    plan = plan_serving([f"a={run}"])
    assert {n: m.system for n, m in plan.models.items() if m.system} == {"a": SYSTEM}
    engine = open_serving(plan, n_ctx=256, threads=1, parallel=2)
    scheduler = Scheduler(engine)
    try:
        app = build_app(scheduler, ["base", "a"], admin={"plan": plan, "loopback": True})
        with TestClient(app) as http:
            def ask(model, *system):
                messages = [{"role": "system", "content": s} for s in system] + \
                    [{"role": "user", "content": "Who are you?"}]
                resp = http.post("/v1/chat/completions", json={
                    "model": model, "messages": messages, "max_tokens": 4, "temperature": 0})
                assert resp.status_code == 200, resp.text
                body = resp.json()
                return body["usage"]["prompt_tokens"], body["choices"][0]["message"]["content"]

            assert ask("a") == ask("a", SYSTEM)  # the same prompt, so the same answer
            assert ask("a", "Be brief.")[0] != ask("a")[0]  # the request's own one wins
            assert ask("base")[0] != ask("a")[0]  # the base has no run: its template's own
    finally:
        scheduler.close()
        engine.close()
