"""Ollama's API on `edge-tune serve`, for real: the official `ollama` Python client against a
server on a free loopback port, a tiny random base with a random adapter, rendered with
Qwen3's template (Hermes tool calls, think markers), and the answers compared with the OpenAI
routes' on the same server (same engine, same scheduler).

A random model does not think by itself: the template given opens the think block in the
prompt with ``think: true`` (as Qwen3's "Thinking-2507" models' template always does), so what
the model then writes is its thinking."""

from __future__ import annotations

import json

import ollama
import openai
import pytest
from tests.helpers.serve_helpers import http_json, one_llama_thread, running_server
from tests.helpers.tiny_models import tiny_adapter

from edge_tune.server.errors import RequestError
from edge_tune.templates.builtin import BUILTIN
from edge_tune.server.ollama_api import chat_body, generate_body, ollama_tool_calls, renamed

CTX = 256
HI = [{"role": "user", "content": "What do bees make?"}]
GREEDY = {"temperature": 0, "num_predict": 12}
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "enum": ["ada", "alan"]},
    "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


CLOSED = "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
OPENS = CLOSED + "    {%- elif enable_thinking is defined %}\n        {{- '<think>\\n' }}\n"


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("ollama")
    adapter = tiny_adapter(root / "pirate.gguf")
    assert BUILTIN["qwen3"].count(CLOSED) == 1
    template = root / "qwen3-opens.jinja"
    template.write_text(BUILTIN["qwen3"].replace(CLOSED, OPENS))
    with one_llama_thread(), running_server("--base", str(tiny), "--adapter",
                                            f"pirate={adapter}", "--ctx", str(CTX),
                                            "--parallel", "2", "--chat-template",
                                            str(template)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=60)


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                         timeout=60)


def test_models_are_listed_shown_and_running(client, server):
    assert [m.model for m in client.list().models] == ["base", "pirate"]
    tag = client.list().models[1]
    assert tag.details.family == "llama" and tag.details.quantization_level == "F32"
    assert tag.details.parent_model == "base" and tag.size > 0 and len(tag.digest) == 64
    shown = client.show("pirate:latest")  # Ollama's tag for "the" version is accepted
    assert shown.modelinfo["general.architecture"] == "llama"
    assert {"completion", "tools", "thinking"} <= set(shown.capabilities)
    assert "<think>" in shown.template and "num_ctx 256" in shown.parameters
    running = client.ps().models
    assert [m.model for m in running] == ["base", "pirate"]
    assert {m.context_length for m in running} == {CTX}
    assert http_json("GET", server.url + "/api/version")[1]["version"]
    with pytest.raises(ollama.ResponseError) as info:
        client.show("pirate:7b")
    assert info.value.status_code == 404 and "base, pirate" in info.value.error


def test_chat_is_the_openai_answer(client, oai, server):
    """A greedy chat through Ollama's route equals the same chat through the OpenAI route,
    token counts too; the adapter changes the answer."""
    answers = {}
    for model in ("base", "pirate"):
        got = client.chat(model=model, messages=HI, options=GREEDY, keep_alive="5m")
        ref = oai.chat.completions.create(model=model, messages=HI, temperature=0,
                                          max_tokens=12)
        assert got.message.role == "assistant"
        assert got.message.content == ref.choices[0].message.content
        assert got.done and got.done_reason == ref.choices[0].finish_reason == "length"
        assert got.eval_count == ref.usage.completion_tokens == 12
        assert got.prompt_eval_count == ref.usage.prompt_tokens
        assert got.total_duration >= got.eval_duration > 0
        answers[model] = got.message.content
    assert answers["base"] != answers["pirate"]
    # edge-tune's adapter mix (a field the ollama client cannot send): pirate at scale 1
    status, mixed = http_json("POST", server.url + "/api/chat", json.dumps({
        "model": "base", "messages": HI, "stream": False, "options": GREEDY,
        "adapters": [{"name": "pirate", "scale": 1.0}]}).encode())
    assert status == 200 and mixed["message"]["content"] == answers["pirate"]


def test_streamed_chat_and_generate_equal_the_whole_answer(client):
    whole = client.chat(model="pirate:latest", messages=HI, options=GREEDY)
    parts = list(client.chat(model="pirate:latest", messages=HI, options=GREEDY, stream=True))
    assert len(parts) > 2 and not any(p.done for p in parts[:-1])
    assert parts[-1].done and parts[-1].done_reason == "length" and parts[-1].eval_count == 12
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert all(p.model == "pirate:latest" for p in parts)
    # /api/generate renders the prompt with the chat template: the same answer as the chat
    gen = client.generate(model="pirate", prompt=HI[0]["content"], options=GREEDY)
    assert gen.response == whole.message.content and gen.done_reason == "length"
    streamed = list(client.generate(model="pirate", prompt=HI[0]["content"], options=GREEDY,
                                    stream=True))
    assert "".join(p.response for p in streamed) == gen.response and streamed[-1].done


def test_raw_generate_is_the_plain_completion(client, oai):
    gen = client.generate(model="base", prompt="Bees make", raw=True, options=GREEDY)
    ref = oai.completions.create(model="base", prompt="Bees make", temperature=0,
                                 max_tokens=12)
    assert gen.response == ref.choices[0].text and gen.eval_count == 12


def test_options_and_format_are_honoured(client):
    base = client.chat(model="base", messages=HI, options={"temperature": 1.0, "seed": 7,
                                                           "num_predict": 10})
    again = client.chat(model="base", messages=HI, options={
        "temperature": 1.0, "seed": 7, "num_predict": 10, "num_ctx": CTX, "num_thread": 4})
    assert again.message.content == base.message.content  # num_ctx, num_thread: no effect
    cut = client.chat(model="base", messages=HI, options={**GREEDY, "num_predict": 3})
    assert cut.eval_count == 3 and cut.done_reason == "length"
    full = client.generate(model="base", prompt="Bees make", raw=True, options=GREEDY)
    word = full.response.split()[2]
    stopped = client.generate(model="base", prompt="Bees make", raw=True, options={
        **GREEDY, "stop": [word]})
    assert stopped.done_reason == "stop"
    assert stopped.response == full.response[:full.response.index(word)]
    got = client.chat(model="pirate", messages=HI, format=SCHEMA,
                      options={"temperature": 0, "num_predict": 60})
    obj = json.loads(got.message.content)
    assert obj["name"] in ("ada", "alan") and 0 <= obj["age"] <= 120
    got = client.chat(model="pirate", messages=HI, format="json", options=GREEDY)
    assert got.message.content.lstrip().startswith("{")  # a random model's keys run long
    logged = client.chat(model="base", messages=HI, options=GREEDY, logprobs=True,
                         top_logprobs=2)
    assert len(logged.logprobs) == 12 and all(len(t.top_logprobs) == 2 for t in logged.logprobs)
    assert "".join(t.token for t in logged.logprobs) == logged.message.content
    parts = list(client.chat(model="base", messages=HI, options=GREEDY, logprobs=True,
                             stream=True))
    assert [t.token for p in parts for t in p.logprobs or []] == \
        [t.token for t in logged.logprobs]


@pytest.mark.parametrize(("kwargs", "status", "names"), [
    ({"options": {"mirostat": 2}}, 400, "'options.mirostat'"),
    ({"options": {"num_gqa": 8}}, 400, "'options.num_gqa': unknown option"),
    ({"options": {"num_ctx": CTX + 1}}, 400, "'options.num_ctx': 257 is more than this "
                                             "server's context of 256"),
    ({"options": {"num_predict": "many"}}, 400, "'options.num_predict'"),
    ({"options": {"temperature": 9}}, 400, "'options.temperature'"),
    ({"format": {"type": "number", "multipleOf": 3}}, 400, "'format"),
    ({"think": "high"}, 400, "'think'"),
    ({"model": "llama3.2"}, 404, "model 'llama3.2' not found; this server has: base, pirate"),
])
def test_bad_requests_name_ollamas_field(client, kwargs, status, names):
    kw = {"model": "base", "messages": HI, **kwargs}
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(**kw)
    assert info.value.status_code == status and names in info.value.error, info.value.error


def test_tools_and_history_reach_the_template(client):
    """Tools are rendered by the model's template (a random model calls none); an assistant
    turn with Ollama's tool_calls and a tool result (tool_name, no id) render too."""
    history = [*HI, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "sunny"}]
    plain = client.chat(model="pirate", messages=HI, options=GREEDY)
    told = client.chat(model="pirate", messages=HI, tools=[WEATHER], options=GREEDY)
    assert told.prompt_eval_count > plain.prompt_eval_count  # the tools are in the prompt
    after = client.chat(model="pirate", messages=history, tools=[WEATHER], options=GREEDY)
    assert after.done and after.prompt_eval_count > told.prompt_eval_count


def test_thinking_comes_back_apart(client):
    """`think` is the template's enable_thinking: true opens the think block in the prompt,
    so the answer is thinking (message.thinking, streamed too; a random model never closes
    the block); false renders an empty block and the answer is content."""
    plain = client.chat(model="pirate", messages=HI, options=GREEDY)
    on = client.chat(model="pirate", messages=HI, options=GREEDY, think=True)
    assert on.message.thinking and on.message.content == "" and on.eval_count == 12
    parts = list(client.chat(model="pirate", messages=HI, options=GREEDY, think=True,
                             stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == on.message.thinking
    assert not any(p.message.content for p in parts)
    off = client.chat(model="pirate", messages=HI, options=GREEDY, think=False)
    assert off.message.thinking is None and off.message.content
    assert off.prompt_eval_count > plain.prompt_eval_count  # the empty block
    gen = client.generate(model="pirate", prompt=HI[0]["content"], options=GREEDY, think=True)
    assert gen.thinking == on.message.thinking and gen.response == ""


def test_think_on_a_template_without_markers_and_feedback_off_are_refused(tiny):
    """As Ollama does: ``think: true`` on a model whose template cannot think is a 400 (false
    is fine); and a verdict sent to a server without --feedback says how to turn them on."""
    with one_llama_thread(), running_server("--base", str(tiny), "--ctx", str(CTX)) as srv:
        plain = ollama.Client(host=srv.url, timeout=60)
        for call in (lambda: plain.chat(model="base", messages=HI, options=GREEDY, think=True),
                     lambda: plain.generate(model="base", prompt="Hi", think=True)):
            with pytest.raises(ollama.ResponseError) as info:
                call()
            assert info.value.status_code == 400
            assert '"base" does not support thinking' in info.value.error
        assert plain.chat(model="base", messages=HI, options=GREEDY, think=False).done
        status, err = http_json("POST", srv.url + "/v1/feedback",
                                json.dumps({"id": "chatcmpl-x", "label": True}).encode())
        assert status == 404 and "only when started with --feedback FILE" in \
            err["error"]["message"], err


def test_embeddings_are_the_openai_routes(client, oai):
    texts = ["What do bees make?", "Name a fruit."]
    got = client.embed(model="base", input=texts)
    ref = oai.embeddings.create(model="base", input=texts, encoding_format="float")
    assert len(got.embeddings) == 2 and got.prompt_eval_count == ref.usage.prompt_tokens
    for mine, theirs in zip(got.embeddings, ref.data):
        assert mine == pytest.approx(theirs.embedding)
    older = client.embeddings(model="base:latest", prompt=texts[1])  # the deprecated route
    assert older.embedding == pytest.approx(got.embeddings[1])
    with pytest.raises(ollama.ResponseError) as info:
        client.embed(model="pirate", input="x")
    assert info.value.status_code == 400 and "base model alone" in info.value.error


def test_loading_and_unknown_routes(client, server):
    """An empty chat is how Ollama clients load a model: answered done_reason "load"."""
    loaded = client.chat(model="pirate", messages=[])
    assert loaded.done and loaded.done_reason == "load"
    status, body = http_json("POST", server.url + "/api/pull", b'{"model": "x"}')
    assert status == 404 and "does not pull" in body["error"]


def test_translation_is_pure():
    """Ollama bodies -> OpenAI bodies, and errors renamed back (no server needed)."""
    body = chat_body({"model": "a", "messages": HI, "options": {"num_predict": 5, "top_k": 3},
                      "format": "json", "think": False}, "a", 128)
    assert body["max_tokens"] == 5 and body["top_k"] == 3 and body["stream"] is True
    assert body["response_format"] == {"type": "json_object"}
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert chat_body({"model": "a", "messages": HI}, "a", 128)["max_tokens"] == 1 << 20
    kind, gen = generate_body({"model": "a", "prompt": "x", "system": "s"}, "a", 128)
    assert kind == "chat" and [m["role"] for m in gen["messages"]] == ["system", "user"]
    assert ollama_tool_calls([{"id": "call_1", "type": "function", "function": {
        "name": "f", "arguments": '{"x": 1}'}}]) == [
        {"id": "call_1", "function": {"index": 0, "name": "f", "arguments": {"x": 1}}}]
    err = renamed(RequestError(400, "'max_tokens': expected an integer", param="max_tokens"))
    assert err.message == "'options.num_predict': expected an integer"
    with pytest.raises(RequestError, match="'suffix'"):
        generate_body({"model": "a", "prompt": "x", "suffix": "y"}, "a", 128)
