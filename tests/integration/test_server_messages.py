"""What the server says when a request cannot be served: the real --ctx, a base that cannot be
removed, the adapters a mix may name, and the admin route in the API's own words (its fields,
not the command line's flags). A real engine on a tiny random model behind the real app."""

from __future__ import annotations

import pytest

CTX = 64  # tokens per sequence: a prompt of a hundred words is over it


@pytest.fixture(scope="module")
def served(tmp_path_factory, default_gguf):
    """(HTTP client of the app, tiny runs): base + adapter "a", --ctx 64, 2 sequences."""
    from starlette.testclient import TestClient
    from tests.helpers.tiny_runs import make_tiny_runs

    from edge_tune.commands.serve import open_serving, plan_serving
    from edge_tune.server.app import build_app
    from edge_tune.server.scheduler import Scheduler

    runs = make_tiny_runs(tmp_path_factory.mktemp("served"), default_gguf)
    plan = plan_serving([f"a={runs['lora']}"], str(runs["base"]))
    engine = open_serving(plan, n_ctx=CTX, threads=1, parallel=2)
    scheduler = Scheduler(engine)
    try:
        app = build_app(scheduler, ["base", "a"], admin={"plan": plan, "loopback": True})
        with TestClient(app) as http:
            yield http, runs
    finally:
        scheduler.close()
        engine.close()


def _error(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def test_prompt_over_the_context_names_the_real_ctx(served):
    http, _ = served
    err = _error(http.post("/v1/completions", json={"model": "base", "prompt": "word " * 100,
                                                    "max_tokens": 4}), 400)
    assert err["code"] == "context_length_exceeded"
    assert f"the context window holds {CTX} tokens" in err["message"], err
    assert "larger --ctx" in err["message"]


def test_base_cannot_be_removed(served):
    http, _ = served
    err = _error(http.delete("/v1/adapters/base"), 400)
    assert err["code"] == "base_not_removable" and "cannot be removed" in err["message"]
    err = _error(http.delete("/v1/adapters/nope"), 404)
    assert err["message"] == "no adapter 'nope' is served; the adapters are: a"


def test_unknown_adapter_in_a_mix_lists_the_adapters(served):
    http, _ = served
    err = _error(http.post("/v1/completions", json={
        "model": "base", "prompt": "hi", "max_tokens": 2,
        "adapters": [{"name": "a", "scale": 0.5}, {"name": "nope"}]}), 404)
    assert err["message"] == ("'adapters[1].name': no adapter 'nope' is served; the adapters "
                              "are: a"), err
    assert err["param"] == "adapters[1]"


@pytest.mark.parametrize("body,param,needle", [
    ({"name": "x", "path": "/nope/run/"}, "path", "'path' /nope/run/: no such file or directory"),
    ({"name": "x", "path": "FULL"}, "path", "a full fine-tuning run is a model of its own"),
    ({"name": "base", "path": "LORA"}, "name", "'name': 'base' is reserved"),
    ({"name": "a", "path": "LORA"}, "name", "'name': 'a' is already served"),
])
def test_admin_errors_speak_the_api(served, body, param, needle):
    http, runs = served
    body = {k: str(runs[v.lower()]) if v in ("FULL", "LORA") else v for k, v in body.items()}
    err = _error(http.post("/v1/adapters", json=body), 400)
    assert needle in err["message"] and err["param"] == param, err
    assert "--" not in err["message"], err  # no command-line flag to drop or give
    assert http.get("/v1/models").json()["data"][-1]["id"] == "a"  # nothing changed
