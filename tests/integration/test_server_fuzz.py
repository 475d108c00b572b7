"""No 5xx from bad input: a property-based fuzz of the HTTP API (hypothesis) against a real
`edge-tune serve` on loopback (a tiny random Qwen2.5-family model, tests/helpers/tiny_families.py).

Bodies are random JSON (types, Unicode with lone surrogates, NaN, sizes, nesting) shaped
like OpenAI requests often enough to reach every check: known fields with random values,
tools, response formats, logprobs, streaming and not, raw non-JSON bytes. Each answer must
be below 500 (a streamed one must not report a server error in-band), and the server must
still answer afterwards."""

from __future__ import annotations

import http.client
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers.serve_helpers import one_llama_thread, running_server
from tests.helpers.tiny_families import family_gguf

PATHS = ["/v1/chat/completions", "/v1/completions"]


@pytest.fixture(scope="module")
def server():
    with one_llama_thread(), running_server("--base", str(family_gguf("qwen2")),
                                            "--ctx", "512", "--max-queue", "4") as srv:
        yield srv


def post(server, path: str, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


text = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates included
scalars = st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | \
    st.floats(allow_nan=True, allow_infinity=True) | text
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(text, inner, max_size=4), max_leaves=12)
small_schema = st.sampled_from([
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
     "required": ["a"]},
    {"type": "string", "enum": ["x", "y"]}, {"type": "array", "items": {"type": "boolean"},
                                             "maxItems": 2},
    {"type": "number", "minimum": 1}, {"not": {}}, {"$ref": "#/nope"}, {"type": "integer",
                                                                       "minimum": 5,
                                                                       "maximum": 1}]) | json_values
tool = st.fixed_dictionaries({"type": st.sampled_from(["function", "x"]) | json_values,
                              "function": st.fixed_dictionaries(
                                  {"name": st.sampled_from(["f", "get_weather"]) | text},
                                  optional={"parameters": small_schema,
                                            "description": text | json_values})})
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]) | text},
    optional={"content": text | st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]), "text": text}), max_size=2)
        | json_values,
        "tool_calls": st.lists(st.fixed_dictionaries({"id": text, "type": st.just("function"),
                                                      "function": st.fixed_dictionaries(
            {"name": text, "arguments": st.sampled_from(['{"a": 1}', "{bad", "[]"]) | text
             | json_values})}), max_size=2) | json_values,
        "tool_call_id": text})


def mostly(good, bad=json_values):
    """A request field: a plausible value nine times in ten, anything else otherwise."""
    return st.sampled_from([True] * 9 + [False]).flatmap(lambda ok: good if ok else bad)


fields = {
    "temperature": mostly(st.sampled_from([0, 0.5, 2])),
    "stream": mostly(st.booleans()),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "stop": mostly(text | st.lists(text, max_size=5)),
    "seed": mostly(st.integers(-(1 << 64), 1 << 65)),
    "top_p": mostly(st.floats(0, 1)), "presence_penalty": mostly(st.floats(-2, 2)),
    "n": mostly(st.just(1)), "adapters": mostly(st.none()), "user": mostly(text),
    "metadata": json_values,
}
chat_fields = {
    **fields,
    "logprobs": mostly(st.booleans()),
    "top_logprobs": mostly(st.integers(-1, 21)),
    "tools": mostly(st.lists(tool, max_size=2)),
    "tool_choice": mostly(st.sampled_from(["auto", "none", "required", {
        "type": "function", "function": {"name": "f"}}])),
    "response_format": mostly(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema"]) | text},
        optional={"json_schema": st.fixed_dictionaries({"name": text}, optional={
            "schema": small_schema, "strict": st.booleans()}) | json_values})),
}
text_fields = {**fields, "logprobs": mostly(st.integers(-1, 6)),
               "echo": mostly(st.just(False)), "suffix": mostly(st.just("")),
               "response_format": chat_fields["response_format"]}
model = mostly(st.just("base"), text | json_values)
extra_keys = st.just({}) | st.dictionaries(text, json_values, max_size=2)


def body(required: dict, optional: dict):
    return st.tuples(st.fixed_dictionaries(required, optional=optional), extra_keys).map(
        lambda pair: {**pair[1], **pair[0]})


max_tokens = mostly(st.integers(1, 6))  # always given: the default (256) costs seconds
chat_body = body({"model": model, "max_tokens": max_tokens,
                  "messages": mostly(st.lists(message, min_size=1, max_size=3))}, chat_fields)
text_body = body({"model": model, "max_tokens": max_tokens,
                  "prompt": mostly(text | st.lists(text, max_size=2))}, text_fields)
chat_request = st.tuples(st.just(PATHS[0]), chat_body.map(lambda b: json.dumps(b).encode()))
text_request = st.tuples(st.just(PATHS[1]), text_body.map(lambda b: json.dumps(b).encode()))
raw_request = st.tuples(st.sampled_from(PATHS), json_values.map(lambda v: json.dumps(v).encode())
                        | st.binary(max_size=64))
requests = st.sampled_from([0, 0, 0, 1, 1, 2]).flatmap(
    lambda i: [chat_request, text_request, raw_request][i])


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=requests)
def _fuzz(server, request):
    path, payload = request
    status, raw = post(server, path, payload)
    assert status < 500, (status, payload[:300], raw[:300])
    assert b'"server_error"' not in raw, (payload[:300], raw[:300])


def test_random_bodies_never_get_a_5xx_and_the_server_keeps_serving(server):
    _fuzz(server)
    status, raw = post(server, PATHS[0], json.dumps({"model": "base", "max_tokens": 2,
                                                     "messages": [{"role": "user",
                                                                   "content": "hi"}]}).encode())
    assert status == 200 and json.loads(raw)["choices"][0]["finish_reason"]
    assert server.health()["status"] == "ok"
