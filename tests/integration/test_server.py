"""The OpenAI-compatible server, for real: `edge-tune serve` on loopback, the official
`openai` client, the embedded model with two real adapters."""

from __future__ import annotations

import http.client
import json

import openai
import pytest
from tests.helpers.cli import assert_one_line_error, run_cli
from tests.helpers.serve_helpers import (
    PROMPTS,
    cli_answer,
    http_json,
    one_llama_thread,
    running_server,
    trained_adapters,
)

from edge_tune.errors import EdgeTuneError
from edge_tune.server import parse_adapter_spec
from edge_tune.server.openai_shapes import RequestError, parse_request

KEY = "test-key-123"
MAX_TOKENS = 24
MODELS = ["base", "pirate", "anti"]


@pytest.fixture(scope="module", autouse=True)
def _one_llama_thread():
    with one_llama_thread():
        yield


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return trained_adapters()


@pytest.fixture(scope="module")
def server(adapters):
    with running_server("--adapter", f"pirate={adapters['pirate']}",
                        "--adapter", f"anti={adapters['anti']}", "--api-key", KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def _chat(client, model: str, prompt: str, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0,
        max_tokens=MAX_TOKENS, **kw)


def test_lists_base_and_every_adapter(client):
    assert [m.id for m in client.models.list()] == MODELS


def test_each_model_answers_as_edge_tune_chat_does(client, adapters):
    """Same prompt, temperature 0: the server's answer for base and for each adapter equals
    `edge-tune chat --prompt` with that adapter, and the three answers differ."""
    prompt = PROMPTS[0]
    answers = {}
    for model, path in [("base", None), ("pirate", adapters["pirate"]),
                        ("anti", adapters["anti"])]:
        resp = _chat(client, model, prompt)
        answers[model] = resp.choices[0].message.content
        assert resp.model == model
        assert resp.choices[0].finish_reason in ("stop", "length")
        assert resp.usage.prompt_tokens > 0 and 0 < resp.usage.completion_tokens <= MAX_TOKENS
        assert answers[model] == cli_answer(prompt, path, MAX_TOKENS), model
    assert answers["pirate"].startswith("Arr")
    assert len(set(answers.values())) == 3, answers


def test_streaming_yields_the_same_text(client):
    for model in MODELS:
        whole = _chat(client, model, PROMPTS[1]).choices[0].message.content
        chunks = list(_chat(client, model, PROMPTS[1], stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == whole, model
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_text_completions_stream_and_not(client):
    kw = {"model": "pirate", "prompt": "1, 2, 3, 4,", "temperature": 0, "max_tokens": 8}
    whole = client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    assert whole.choices[0].text == streamed and whole.choices[0].text.strip()
    assert whole.usage.completion_tokens == 8 and whole.choices[0].finish_reason == "length"


def test_stream_usage_chunk_when_asked(client):
    chunks = list(_chat(client, "anti", PROMPTS[2], stream=True,
                        stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        _chat(client, "no-such-adapter", "hi")
    err = info.value.body
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "base, pirate, anti" in err["message"]


def test_bad_body_is_400(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, "base", "hi", top_p=7)
    assert info.value.body["param"] == "top_p"
    status, body = http_json("POST", server.url + "/v1/chat/completions", b"{not json",
                        {"Authorization": f"Bearer {KEY}"})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = http_json("POST", server.url + "/v1/chat/completions",
                        json.dumps({"model": "base", "messages": []}).encode(),
                        {"Authorization": f"Bearer {KEY}"})
    assert status == 400 and body["error"]["param"] == "messages"


def test_fields_it_cannot_honour_are_400_naming_them(client):
    """Tools on a template without a tool format (the default model's ChatML), n > 1,
    logit_bias and a streamed echo are refused, not silently dropped; their "off" values
    are fine.
    (What is honoured: tests/integration/test_server_api.py.)"""
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    for kw, param in [({"tools": [tool]}, "tools"), ({"tool_choice": "required"}, "tool_choice"),
                      ({"n": 2}, "n"), ({"logit_bias": {"1": 5}}, "logit_bias")]:
        with pytest.raises(openai.BadRequestError) as info:
            _chat(client, "base", "hi", **kw)
        err = info.value.body
        assert err["param"] == param and err["type"] == "invalid_request_error", err
        assert err["message"].startswith(f"'{param}': "), err
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="base", prompt="1, 2,", max_tokens=2, echo=True,
                                  stream=True)
    assert info.value.body["param"] == "echo"
    ok = _chat(client, "base", "hi", tools=[], tool_choice="none", logprobs=False,
               response_format={"type": "text"}, n=1)
    assert ok.choices[0].message.content is not None


def test_prompt_over_the_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, "pirate", "tell me about " + "bees and honey " * 2000)
    assert info.value.body["code"] == "context_length_exceeded"
    assert _chat(client, "pirate", PROMPTS[0]).choices[0].message.content  # still serving


def test_wrong_or_missing_key_is_401(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.body["code"] == "invalid_api_key"
    status, body = http_json("GET", server.url + "/v1/models")
    assert status == 401 and "Missing API key" in body["error"]["message"]
    assert http_json("GET", server.url + "/health")[0] == 200  # liveness needs no key


def test_unknown_route_is_openai_shaped_404(server):
    status, body = http_json("GET", server.url + "/v1/nothing",
                        headers={"Authorization": f"Bearer {KEY}"})
    assert status == 404 and "no such route" in body["error"]["message"]


def test_client_that_disconnects_mid_stream_frees_the_slot(server, client):
    """A long streamed answer; the client reads three chunks and hangs up. The worker must
    stop generating at once (counted as cancelled, with far fewer tokens than asked for),
    and the next request is served."""
    before = server.health()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": "base", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 400, "temperature": 0,
         "stream": True}), {"Authorization": f"Bearer {KEY}",
                            "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    seen = 0
    while seen < 3:
        if resp.readline().startswith(b"data: {"):
            seen += 1
    conn.sock.shutdown(2)
    conn.close()
    import time

    end = time.monotonic() + 60
    while time.monotonic() < end:
        now = server.health()
        if now["cancelled"] > before["cancelled"] and not now["busy"]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the cancelled stream kept the engine busy: {now}")
    assert now["tokens_generated"] - before["tokens_generated"] < 100, now
    assert _chat(client, "base", PROMPTS[3]).choices[0].message.content


# --- bad start-up input: one line, exit 2, before any model loads -----------------------------

def test_adapter_spec_needs_a_name():
    with pytest.raises(EdgeTuneError, match="expected NAME=PATH"):
        parse_adapter_spec("runs/demo")
    with pytest.raises(EdgeTuneError, match="reserved"):
        parse_adapter_spec("base=runs/demo")
    assert parse_adapter_spec("my-skill.v2=a=b.gguf") == ("my-skill.v2", "a=b.gguf")


def test_serve_bad_inputs_are_one_line_errors(tmp_path, adapters):
    assert_one_line_error(run_cli("serve", "--adapter", "nope"), "NAME=PATH")
    assert_one_line_error(run_cli("serve", "--adapter", f"x={tmp_path / 'missing.gguf'}"),
                          "missing.gguf", "no such file")
    assert_one_line_error(run_cli("serve", "--adapter", f"a={adapters['anti']}",
                                  "--adapter", f"a={adapters['anti']}"), "used twice")


def test_serve_refuses_an_adapter_for_another_architecture(tmp_path):
    from tests.helpers.gguf_helpers import q_pair, write_adapter

    qwen = write_adapter(tmp_path / "qwen.gguf", "qwen2", q_pair())
    assert_one_line_error(run_cli("serve", "--adapter", f"q={qwen}"), "qwen.gguf", "qwen2")


def test_serve_refuses_a_port_in_use(server):
    assert_one_line_error(run_cli("serve", "--port", str(server.port)), str(server.port),
                          "--port")


# --- request validation (pure) ------------------------------------------------------------------

@pytest.mark.parametrize("body,status,param", [
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ({"model": "zzz", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"model": "base", "messages": "hi"}, 400, "messages"),
    ({"model": "base", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0]"),
    ({"model": "base", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
     400, "temperature"),
    ({"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
     400, "max_tokens"),
    ({"model": "base", "messages": [{"role": "user", "content": "x"}], "stop": [1]},
     400, "stop"),
    ({"model": "base", "messages": [{"role": "user", "content": "x"}], "frobnicate": 1},
     400, "frobnicate"),
])
def test_parse_request_rejects(body, status, param):
    with pytest.raises(RequestError) as info:
        parse_request("chat", body, MODELS)
    assert info.value.status == status and info.value.param == param


def test_parse_request_maps_fields():
    req = parse_request("chat", {"model": "pirate", "stream": True, "temperature": 0,
                                 "max_completion_tokens": 9, "stop": "\n", "top_p": 0.5,
                                 "messages": [{"role": "developer", "content": "be brief"},
                                              {"role": "user", "content": [
                                                  {"type": "text", "text": "hi"}]}]}, MODELS)
    assert req.adapter == "pirate" and req.stream and req.temperature == 0
    assert req.max_tokens == 9 and req.sampling == {"stop": ["\n"], "top_p": 0.5}
    assert req.messages == [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": "hi"}]
    assert parse_request("text", {"model": "base", "prompt": "x"}, MODELS).adapter is None


# --- chat --compare ---------------------------------------------------------------------------

def _table_columns(text: str) -> list[str]:
    """The cells of a rich table printed as text, column by column, whitespace joined."""
    cols: list[list[str]] = []
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip("│").split("│")]
        cols = cols or [[] for _ in cells]
        for col, cell in zip(cols, cells):
            col.append(cell)
    return [" ".join(" ".join(c).split()) for c in cols]


def test_chat_compare_shows_both_answers_side_by_side(adapters):
    proc = run_cli("chat", "--adapter", str(adapters["pirate"]), "--compare", "base",
                   "--prompt", PROMPTS[0], "--temperature", "0", "--max-tokens",
                   str(MAX_TOKENS))
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("┃"))
    assert "serve-pirate" in header and "base" in header
    left, right = _table_columns(proc.stdout)
    assert left == " ".join(cli_answer(PROMPTS[0], adapters["pirate"], MAX_TOKENS).split())
    assert right == " ".join(cli_answer(PROMPTS[0], None, MAX_TOKENS).split())
    assert_one_line_error(run_cli("chat", "--adapter", str(adapters["anti"]), "--compare",
                                  str(adapters["anti"]), "--prompt", "hi"), "same adapter")
