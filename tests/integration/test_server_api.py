"""The server's OpenAI API surface, for real: `edge-tune serve` on tiny random models of real
families (tests/helpers/tiny_families.py: Qwen2.5's template with Hermes tool calls, Llama 3's with
JSON calls, SmolLM2-style ChatML with none), the official `openai` client.

A random tiny model does not call tools or write JSON by itself: these tests force the
shape with llama.cpp grammars (response_format, tool_choice required/named), and test the
parser of the model's calls on hand-written answers."""

from __future__ import annotations

import json
import re

import openai
import pytest
from tests.helpers.cli import assert_one_line_error, run_cli_in_process
from tests.helpers.serve_helpers import one_llama_thread, running_server
from tests.helpers.tiny_families import family_gguf
from tests.helpers.tiny_models import tiny_adapter, tiny_llama_gguf

from edge_tune.server.openai_shapes import RequestError, parse_request
from edge_tune.server.tools import (HERMES, LLAMA3, MISTRAL, CallStream, fit_call_ids,
                                    parse_calls, syntax_of)
from edge_tune.templates.builtin import BUILTIN

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}}}
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "enum": ["ada", "alan"]},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["x", "y"]}, "maxItems": 2}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def servers():
    """qwen2 (tools in its template), llama (Llama-3 JSON calls) and mistral (Mistral v0.3's
    template: [TOOL_CALLS], a control token), one server each."""
    with one_llama_thread(), \
            running_server("--base", str(family_gguf("qwen2")), "--ctx", "1024") as qwen, \
            running_server("--base", str(family_gguf("llama")), "--ctx", "2048") as llama, \
            running_server("--base", str(family_gguf("mistral")), "--ctx", "1024") as mistral:
        yield {"qwen2": qwen, "llama": llama, "mistral": mistral}


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def qwen(servers):
    return _client(servers["qwen2"])


def _validate(obj, schema: dict) -> None:
    """The JSON Schema keywords these tests use (jsonschema is not a dependency)."""
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(obj, dict), obj
        props = schema.get("properties", {})
        assert set(schema.get("required", [])) <= set(obj), obj
        if schema.get("additionalProperties") is False:
            assert set(obj) <= set(props), obj
        for key, value in obj.items():
            if key in props:
                _validate(value, props[key])
    elif kind == "array":
        assert isinstance(obj, list) and len(obj) <= schema.get("maxItems", len(obj)), obj
        for item in obj:
            _validate(item, schema["items"])
    elif kind == "integer":
        assert isinstance(obj, int) and not isinstance(obj, bool), obj
        assert schema.get("minimum", obj) <= obj <= schema.get("maximum", obj), obj
    elif kind == "string":
        assert isinstance(obj, str), obj
    if "enum" in schema:
        assert obj in schema["enum"], obj


def test_json_schema_answer_parses_and_validates(qwen):
    for stream in (False, True):
        kw = dict(model="base", messages=USER, temperature=0, max_tokens=80,
                  response_format={"type": "json_schema", "json_schema": {
                      "name": "person", "schema": SCHEMA, "strict": True}})
        if stream:
            text = "".join(c.choices[0].delta.content or ""
                           for c in qwen.chat.completions.create(stream=True, **kw)
                           if c.choices)
        else:
            resp = qwen.chat.completions.create(**kw)
            assert resp.choices[0].finish_reason == "stop"
            text = resp.choices[0].message.content
        _validate(json.loads(text), SCHEMA)


def test_json_object_answer_is_json(qwen):
    resp = qwen.chat.completions.create(model="base", messages=USER, temperature=0.8, seed=3,
                                        max_tokens=200,
                                        response_format={"type": "json_object"})
    if resp.choices[0].finish_reason == "stop":  # a random model may write a long string
        assert isinstance(json.loads(resp.choices[0].message.content), dict)
    else:
        assert resp.choices[0].message.content.lstrip().startswith("{")


def test_text_completions_honour_response_format(qwen):
    """/v1/completions takes response_format too (as llama-server does), streamed or not."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    kw = dict(model="base", prompt="A person, as JSON:", temperature=0, max_tokens=80,
              extra_body={"response_format": fmt})
    whole = qwen.completions.create(**kw).choices[0]
    assert whole.finish_reason == "stop"
    _validate(json.loads(whole.text), SCHEMA)
    streamed = "".join(c.choices[0].text for c in qwen.completions.create(stream=True, **kw)
                       if c.choices)
    assert streamed == whole.text
    with pytest.raises(openai.BadRequestError) as info:
        qwen.completions.create(model="base", prompt="x", max_tokens=4, extra_body={
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "number", "multipleOf": 3}}}})
    assert info.value.body["param"] == "response_format.json_schema.schema"


def test_integer_bounds_are_printed_as_integers(qwen):
    with pytest.raises(openai.BadRequestError) as info:
        qwen.completions.create(model="base", prompt="x", max_tokens=2_000_000)
    assert "expected an integer from 1 to 1048576, got 2000000" in info.value.body["message"]


def test_a_schema_llama_cpp_cannot_enforce_is_400(qwen):
    with pytest.raises(openai.BadRequestError) as info:
        qwen.chat.completions.create(model="base", messages=USER, max_tokens=4,
                                     response_format={"type": "json_schema", "json_schema": {
                                         "name": "x", "schema": {"$ref": "http://e.x/s"}}})
    assert info.value.body["param"] == "response_format.json_schema.schema"


@pytest.mark.parametrize("family", ["qwen2", "llama", "mistral"])
def test_forced_tool_call_comes_back_as_tool_calls(servers, family):
    client = _client(servers[family])
    for choice, name in [("required", None), ({"type": "function", "function": {
            "name": "get_time"}}, "get_time")]:
        resp = client.chat.completions.create(model="base", messages=USER, tools=[WEATHER, TIME],
                                              tool_choice=choice, temperature=0, max_tokens=200)
        c = resp.choices[0]
        assert c.finish_reason == "tool_calls", c
        (call,) = c.message.tool_calls
        assert call.type == "function" and (re.fullmatch(r"[0-9a-f]{9}", call.id) if
                                            family == "mistral" else call.id.startswith("call_"))
        assert call.function.name in (name or "get_weather get_time").split()
        args = json.loads(call.function.arguments)
        tool = WEATHER if call.function.name == "get_weather" else TIME
        _validate(args, tool["function"]["parameters"])


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_streamed_tool_call_deltas(servers, family):
    chunks = list(_client(servers[family]).chat.completions.create(
        model="base", messages=USER, tools=[WEATHER], tool_choice="required", temperature=0,
        max_tokens=200, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas and deltas[0].index == 0 and deltas[0].function.name == "get_weather"
    args = "".join(d.function.arguments or "" for d in deltas)
    _validate(json.loads(args), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_tool_history_is_rendered(servers, family):
    """An assistant turn with tool_calls and a tool result go through the template (an
    OpenAI-style id too, which Mistral's template refuses unless made 9 characters)."""
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_5f3a9e1c2b7d4e6f8a0b1c2d", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_5f3a9e1c2b7d4e6f8a0b1c2d",
         "content": "sunny, 21 C"}]
    resp = _client(servers[family]).chat.completions.create(
        model="base", messages=history, tools=[WEATHER], temperature=0, max_tokens=4)
    assert resp.usage.prompt_tokens > 0 and resp.choices[0].finish_reason


def test_tools_on_a_template_without_tools_is_400(servers, tmp_path):
    """SmolLM2-style ChatML (no tool format) given as --chat-template."""
    client = _client(servers["qwen2"])
    assert syntax_of(BUILTIN["chatml"]) is None
    assert syntax_of(BUILTIN["qwen2"]) is HERMES and syntax_of(BUILTIN["llama3"]) is LLAMA3
    assert syntax_of(BUILTIN["mistral"]) is MISTRAL
    with running_server("--base", str(family_gguf("qwen2")), "--ctx", "512",
                        "--chat-template", "chatml") as srv:
        with pytest.raises(openai.BadRequestError) as info:
            _client(srv).chat.completions.create(model="base", messages=USER, tools=[WEATHER],
                                                 max_tokens=4)
        assert info.value.body["param"] == "tools"
    assert client.models.list().data[0].id == "base"


def test_call_parser_on_hand_written_answers():
    names = ["get_weather", "get_time"]
    content, calls = parse_calls('Let me check.\n<tool_call>\n{"name": "get_weather", '
                                 '"arguments": {"city": "Rome", "days": 2}}\n</tool_call>\n'
                                 '<tool_call>\n{"name": "get_time", "arguments": {"zone": '
                                 '"UTC"}}\n</tool_call>', HERMES, names)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == names
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome", "days": 2}
    content, calls = parse_calls('<|python_tag|>{"name": "get_time", "parameters": '
                                 '{"zone": "CET"}}', LLAMA3, names)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"zone": "CET"}
    for text, syntax in [("<tool_call>\n{broken json\n</tool_call>", HERMES),
                         ('{"name": "rm_rf", "parameters": {}}', LLAMA3),
                         ("Plain answer.", LLAMA3)]:
        assert parse_calls(text, syntax, names) == (text, [])
    stream = CallStream(HERMES, names)
    sent = [stream.feed(p) for p in ["Sure", ". <tool", "_call>\n{\"name\": \"get_time\", ",
                                     "\"arguments\": {\"zone\": \"UTC\"}}\n</tool_call>"]]
    assert "".join(sent) == "Sure. "
    rest, calls = stream.finish()
    assert rest is None and calls[0]["function"]["name"] == "get_time"


def test_mistral_calls_with_and_without_the_control_token():
    """Mistral writes ``[TOOL_CALLS] [...]``; llama.cpp leaves the control token out of the
    answer's text, so a bare list of calls is calls too; ids are 9 characters."""
    names = ["get_weather", "get_time"]
    two = ('[{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}, '
           '{"name": "get_time", "arguments": {"zone": "CET"}}]')
    for text, content in [("[TOOL_CALLS] " + two, None), (" " + two, None),
                          ("Checking.[TOOL_CALLS]" + two, "Checking.")]:
        got, calls = parse_calls(text, MISTRAL, names)
        assert got == content and [c["function"]["name"] for c in calls] == names, text
        assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "days": 3}
        assert all(re.fullmatch(r"[0-9a-f]{9}", c["id"]) for c in calls)
    for text in ['[{"name": "rm_rf", "arguments": {}}]', "[1, 2, 3]", "[TOOL_CALLS] [{",
                 "Plain answer [with brackets]."]:
        assert parse_calls(text, MISTRAL, names) == (text, []), text
    for pieces, sent, rest, n in [(["Sure", ". [TOOL", "_CALLS] [", two[1:]], "Sure. ", None, 2),
                                  ([" [", two[1:]], "", None, 2),
                                  ([" [1, 2]", " then"], "", " [1, 2] then", 0),
                                  (["Fine [", "TOOL_CALLS]" + two], "Fine ", None, 2)]:
        stream = CallStream(MISTRAL, names)
        assert "".join(stream.feed(p) for p in pieces) == sent, pieces
        got, calls = stream.finish()
        assert (got, len(calls)) == (rest, n), pieces
    history = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_ab-cd", "type": "function", "function": {"name": "f", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "call_ab-cd", "content": "1"}]
    fitted = fit_call_ids(history, MISTRAL)
    assert fitted[0]["tool_calls"][0]["id"] == fitted[1]["tool_call_id"] == "0callabcd"
    assert fit_call_ids(history, HERMES) is history


def test_logprobs_shapes_and_greedy_top(qwen):
    resp = qwen.chat.completions.create(model="base", messages=USER, temperature=0,
                                        max_tokens=6, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    first = content[0]
    assert first.top_logprobs[0].token == first.token  # greedy: the most likely token
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True)
        assert t.logprob <= t.top_logprobs[0].logprob + 1e-9
    answer = b"".join(bytes(t.bytes) for t in content).decode("utf-8", errors="ignore")
    assert answer == resp.choices[0].message.content
    streamed = [t for c in qwen.chat.completions.create(
        model="base", messages=USER, temperature=0, max_tokens=6, logprobs=True,
        top_logprobs=3, stream=True) if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 5)) for t in streamed] == \
        [(t.token, round(t.logprob, 5)) for t in content]
    text = qwen.completions.create(model="base", prompt="1, 2, 3,", temperature=0, max_tokens=4,
                                   logprobs=2)
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset[0] == 0 and all(len(d) <= 3 for d in lp.top_logprobs)


def test_stop_strings(qwen):
    whole = qwen.completions.create(model="base", prompt="1, 2, 3,", temperature=0,
                                    max_tokens=12).choices[0].text
    assert len(whole) > 3
    stop = whole[2:4]
    cut = qwen.completions.create(model="base", prompt="1, 2, 3,", temperature=0, max_tokens=12,
                                  stop=[stop, "\u2603"])
    assert cut.choices[0].text == whole[:whole.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_unsupported_fields_are_400_and_no_effect_fields_accepted(qwen):
    for kw, param in [({"n": 2}, "n"), ({"logit_bias": {"5": 10}}, "logit_bias"),
                      ({"modalities": ["audio"]}, "modalities"),
                      ({"reasoning_effort": "high"}, "reasoning_effort"),
                      ({"top_logprobs": 2}, "top_logprobs"),
                      ({"tool_choice": "required"}, "tool_choice"),
                      ({"stop": ["a", "b", "c", "d", "e"]}, "stop")]:
        with pytest.raises(openai.BadRequestError) as info:
            qwen.chat.completions.create(model="base", messages=USER, max_tokens=2, **kw)
        assert info.value.body["param"] == param, (kw, info.value.body)
    with pytest.raises(openai.BadRequestError) as info:
        # echo is honoured (tests/integration/test_server_scoring.py), but not streamed
        qwen.completions.create(model="base", prompt="x", max_tokens=2, echo=True, stream=True)
    assert info.value.body["param"] == "echo"
    resp = qwen.chat.completions.create(
        model="base", messages=USER, max_tokens=2, user="u1", metadata={"k": "v"}, store=False,
        service_tier="auto", parallel_tool_calls=False, n=1, logprobs=False,
        response_format={"type": "text"}, tool_choice="none")
    assert resp.choices[0].message.content is not None


def test_lone_surrogate_is_400_naming_the_field(servers):
    from tests.helpers.serve_helpers import http_json

    body = '{"model": "base", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    status, err = http_json("POST", servers["qwen2"].url + "/v1/chat/completions",
                            body.encode(), {"Content-Type": "application/json"})
    assert status == 400 and err["error"]["param"] == "messages[0].content", err
    with pytest.raises(RequestError):
        parse_request("chat", json.loads(body), ["base"])


@pytest.fixture(scope="module")
def tiny_mix(default_gguf, tmp_path_factory):
    """A tiny random Llama (SmolLM2's tokenizer and ChatML template) and two strong random
    adapters, served as "a" and "b"."""
    root = tmp_path_factory.mktemp("mix")
    files = {"base": tiny_llama_gguf(root / "tiny.gguf", default_gguf),
             "a": tiny_adapter(root / "a.gguf", seed=1),
             "b": tiny_adapter(root / "b.gguf", seed=2)}
    with one_llama_thread(), running_server("--base", str(files["base"]), "--ctx", "512",
                                            "--adapter", f"a={files['a']}",
                                            "--adapter", f"b={files['b']}") as srv:
        yield files, _client(srv)


def test_a_mixed_chat_equals_the_servers_mix(tiny_mix):
    """`chat --adapter A=0.7 --adapter B=0.3 --prompt` answers as the server does for the
    request field "adapters": [{a, 0.7}, {b, 0.3}] (greedy), and unlike a or b alone."""
    files, client = tiny_mix
    ask = dict(model="base", messages=USER, temperature=0, max_tokens=8)

    def served(mix):
        return client.chat.completions.create(**ask, extra_body={"adapters": [
            {"name": n, "scale": s} for n, s in mix]}).choices[0].message.content

    mixed = served([("a", 0.7), ("b", 0.3)])
    assert mixed not in (served([("a", 1)]), served([("b", 1)]))
    with one_llama_thread():
        for options in [("--adapter", f"{files['a']}=0.7", "--adapter", f"{files['b']}=0.3"),
                        ("--adapter", str(files["a"]), "--adapter-scale", "0.5")]:
            proc = run_cli_in_process("chat", "--base", str(files["base"]), *options,
                                      "--prompt", USER[0]["content"], "--temperature", "0",
                                      "--max-tokens", "8")
            assert proc.returncode == 0, proc.stderr
            want = mixed if "0.7" in options[1] else served([("a", 0.5)])
            assert proc.stdout == want + "\n"


@pytest.mark.parametrize("options, needle", [
    (["--adapter", "A=2e9"], "out of range"),
    (["--adapter", "A=nan"], "out of range"),
    (["--adapter", "A=lots"], "'lots' is not a number"),
    (["--adapter", "A", "--adapter-scale", "-9"], "--adapter-scale: scale -9 is out of range"),
    (["--adapter", "A=0.5", "--adapter", "B", "--adapter-scale", "0.5"], "scales one"),
    (["--adapter-scale", "0.5"], "scales one"),
    (["--adapter", "A=0.5", "--adapter", "A=0.2"], "twice in the mix"),
    (["--adapter", "NOPE=0.5", "--adapter", "A"], "NOPE: no such file"),
    (["--adapter", "=0.5"], "no adapter before '='"),
])
def test_bad_adapter_scales_and_names_are_one_line_errors(tiny_mix, options, needle):
    files = tiny_mix[0]
    args = [o.replace("A", str(files["a"])).replace("B", str(files["b"])) if o != "NOPE=0.5"
            else str(files["a"].parent / "nope.gguf") + "=0.5" for o in options]
    needle = needle.replace("NOPE", str(files["a"].parent / "nope.gguf"))
    proc = run_cli_in_process("chat", "--base", str(files["base"]), *args, "--prompt", "hi")
    assert_one_line_error(proc, needle)
