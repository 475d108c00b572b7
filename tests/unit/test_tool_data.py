"""Tool-calling data, whole (issue 15, item 6).

A record's ``tools`` schemas go to the chat template (and are checked in the rendered text);
assistant ``tool_calls`` with ``content: null`` (OpenAI's form) are trained as the template
renders them, with OpenAI's JSON-string arguments turned into the objects HF templates expect;
``tool`` results are context, never trained; a template that cannot render tool calls (SmolLM2's
ChatML drops them: the turn renders empty) is a per-record error, never an empty trained turn;
``data inspect`` shows and counts it all.

Records go through the real path (``read_records`` -> the job records ``train`` sends its
worker -> the worker's ``tokenize_records``) with byte-level tokenizers (chat_tokenizer.py) and
the built-in templates of edge_tune.templates.builtin.
"""

from __future__ import annotations

import io
import json

import pytest

from tests.helpers.chat_tokenizer import byte_tokenizer
from edge_tune.data.formats import read_records
from edge_tune.errors import EdgeTuneError
from edge_tune.templates.builtin import BUILTIN

IGNORE = -100
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
# OpenAI's fine-tuning form: content null, arguments a JSON string.
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
CONVERSATION = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
                 "content": "18 C and sunny"},
                {"role": "assistant", "content": "It is 18 C and sunny in Paris."}]
RECORD = {"messages": CONVERSATION, "tools": [WEATHER]}
TOOL_FAMILIES = ["qwen2", "llama3", "qwen3"]  # templates with a tool format


def write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def job_records(path) -> list[dict]:
    from edge_tune.data.formats import job_record as _job_record

    return [_job_record(r) for r in read_records(path).records]


def tokenize(tok, records, **kw):
    from edge_tune.training.worker import tokenize_records

    return tokenize_records(tok, records, 4096, lambda e: None, "training", **kw)


def decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def split(tok, ex) -> tuple[list[str], list[str]]:
    """(trained runs, context runs) of an example, decoded."""
    trained, context, cur, flag = [], [], [], None
    for t, lab in zip(ex.input_ids, ex.labels):
        if flag is not None and (lab != IGNORE) != flag:
            (trained if flag else context).append(decode(tok, cur))
            cur = []
        flag = lab != IGNORE
        cur.append(t)
    if cur:
        (trained if flag else context).append(decode(tok, cur))
    return trained, context


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return write(tmp_path_factory.mktemp("tools") / "tools.jsonl", [RECORD])


@pytest.mark.parametrize("family", TOOL_FAMILIES)
def test_the_tools_schemas_reach_the_template(data, family):
    tok = byte_tokenizer(BUILTIN[family], family)
    for ex in tokenize(tok, job_records(data)):
        trained, context = split(tok, ex)
        shown = "".join(context)
        assert "get_weather" in shown and "Current weather in a city" in shown  # the schema
        assert '"required"' in shown
        assert not any("Current weather" in t for t in trained)  # context, not trained


EXPECTED_TRAINED = {
    "qwen2": [['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
               '</tool_call><|im_end|>\n', "It is 18 C and sunny in Paris.<|im_end|>\n"]],
    "llama3": [['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                "It is 18 C and sunny in Paris.<|eot_id|>"]],
    # Qwen3 shows the call without its (empty) think block once a later turn follows: each
    # turn is its own example, trained as it is generated.
    "qwen3": [['<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
               '{"city": "Paris"}}\n</tool_call><|im_end|>\n'],
              ["<think>\n\n</think>\n\nIt is 18 C and sunny in Paris.<|im_end|>\n"]],
}


@pytest.mark.parametrize("family", TOOL_FAMILIES)
def test_content_null_tool_calls_are_trained_as_the_template_renders_them(data, family):
    """OpenAI's ``"arguments": "{\\"city\\": \\"Paris\\"}"`` reaches the template as an object:
    rendered as JSON, not as a quoted string."""
    tok = byte_tokenizer(BUILTIN[family], family)
    examples = tokenize(tok, job_records(data))
    assert [split(tok, ex)[0] for ex in examples] == EXPECTED_TRAINED[family]


@pytest.mark.parametrize("family", TOOL_FAMILIES)
def test_tool_results_are_context_never_trained(data, family):
    tok = byte_tokenizer(BUILTIN[family], family)
    examples = tokenize(tok, job_records(data))
    assert any("18 C and sunny\n" in "".join(split(tok, ex)[1]) or
               '"18 C and sunny"' in "".join(split(tok, ex)[1]) for ex in examples)
    for ex in examples:
        assert not any("18 C and sunny" in t and "Paris." not in t for t in split(tok, ex)[0])


@pytest.mark.parametrize("content", [None, ""])
def test_a_template_that_drops_tool_calls_is_a_record_error(tmp_path, content):
    """SmolLM2's ChatML renders no tool_calls: the turn would be an empty trained turn."""
    msgs = [CONVERSATION[0], {**CONVERSATION[1], "content": content}, *CONVERSATION[2:]]
    path = write(tmp_path / "d.jsonl", [{"messages": CONVERSATION[:1] + CONVERSATION[3:]},
                                        {"messages": msgs}])
    tok = byte_tokenizer(BUILTIN["chatml"], "chatml")
    with pytest.raises(EdgeTuneError) as err:
        tokenize(tok, job_records(path))
    assert str(err.value) == (
        f"{path}:2: the chat template does not render tool_calls (assistant turn 1 calls "
        "'get_weather' but renders as '<|im_end|>\\n'; use --chat-template qwen2|llama3 or "
        "another template that renders tool calls)")
    assert err.value.exit_code == 2
    assert len(tokenize(tok, job_records(path), skip_invalid=True)) == 1


def test_tools_a_template_does_not_show_are_a_record_error(tmp_path):
    record = {"messages": [CONVERSATION[0], CONVERSATION[3]], "tools": [WEATHER]}
    path = write(tmp_path / "d.jsonl", [record])
    with pytest.raises(EdgeTuneError, match=rf"^{path}:1: the chat template does not render the "
                       r"record's tools \(function 'get_weather' is not in the rendered text; "
                       r"use --chat-template qwen2\|llama3"):
        tokenize(byte_tokenizer(BUILTIN["chatml"], "chatml"), job_records(path))


def test_llama3_one_call_per_turn_is_the_records_fault(tmp_path):
    two = {**CONVERSATION[1], "tool_calls": [CALL, {**CALL, "id": "call_2"}]}
    path = write(tmp_path / "d.jsonl", [{"messages": [CONVERSATION[0], two, *CONVERSATION[2:]],
                                         "tools": [WEATHER]}])
    with pytest.raises(EdgeTuneError, match=rf"^{path}:1: the template says: This model only "
                       r"supports single tool-calls at once!$"):
        tokenize(byte_tokenizer(BUILTIN["llama3"], "llama3"), job_records(path))


# --- the data file's side: shapes and one-line errors ------------------------------------

def test_arguments_and_tools_are_read_as_objects(tmp_path):
    flat = {"name": "get_weather", "arguments": {"city": "Paris"}}  # HF's flat form
    msgs = [CONVERSATION[0], {"role": "assistant", "tool_calls": [flat]}, *CONVERSATION[2:]]
    path = write(tmp_path / "d.jsonl", [RECORD, {"messages": msgs,
                                                 "tools": json.dumps([WEATHER])}])
    one, two = read_records(path).records
    assert one.tools == [WEATHER] and two.tools == [WEATHER]  # a JSON string column is parsed
    wanted = {"type": "function", "function": {"name": "get_weather",
                                               "arguments": {"city": "Paris"}}}
    assert one.messages[1]["tool_calls"] == [{**wanted, "id": "call_1"}]
    assert two.messages[1]["tool_calls"] == [wanted]
    assert one.where == f"{path}:1" and two.where == f"{path}:2"


BAD_CALL = {"messages": [CONVERSATION[0], {"role": "assistant", "content": None, "tool_calls": [
    {"type": "function", "function": {"name": "f", "arguments": "{city: Paris}"}}]}]}


@pytest.mark.parametrize("record,contains", [
    (BAD_CALL, "messages[1]: tool_calls[0]: 'arguments' is not valid JSON (Expecting property "
               "name enclosed in double quotes at column 2; expected a JSON object)"),
    ({"messages": [CONVERSATION[0], {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "[1]"}}]}]},
     "tool_calls[0]: 'arguments' must be a JSON object (or a string holding one), got array"),
    ({"messages": [CONVERSATION[0], {"role": "assistant", "tool_calls": [
        {"function": {"arguments": {}}}]}]}, "tool_calls[0]: missing function name"),
    ({**RECORD, "tools": {"name": "x"}}, "'tools' must be a list of function schemas, got object"),
    ({**RECORD, "tools": [{"type": "function"}]}, "tools[0]: expected a function schema"),
])
def test_bad_tool_data_is_one_line_with_its_line(tmp_path, record, contains):
    path = write(tmp_path / "d.jsonl", [RECORD, record])
    with pytest.raises(EdgeTuneError) as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}:2: ") and contains in str(err.value), str(err.value)


# --- data inspect -------------------------------------------------------------------------

def test_data_inspect_shows_tools_and_counts(data):
    from rich.console import Console

    from edge_tune.data.inspect import inspect_records
    from edge_tune.render.inspect import render_inspect

    tok = byte_tokenizer(BUILTIN["qwen2"], "qwen2")
    report = inspect_records(tok, read_records(data), data, "tiny-qwen2", 512)
    assert report["tools"] == {"records_with_tools": 1, "tool_calls": 1, "tool_results": 1,
                               "context_turns": 0}
    first = report["first_example"]
    assert first["tools"] == ["get_weather"] and first["tool_calls"] == 1
    trained = [first["text"][a:b] for a, b in first["spans"]]
    assert trained[0].startswith('<tool_call>\n{"name": "get_weather"')
    assert "Current weather in a city" in first["text"][:first["spans"][0][0]]
    console = Console(width=200, record=True, color_system=None, file=io.StringIO())
    render_inspect(report, console)
    text = console.export_text()
    assert "1 records with tools, 1 tool calls, 1 tool results (context)" in text
    assert "tools given to the template: get_weather" in text
    assert '\u27e6<tool_call>\n{"name": "get_weather"' in text


def test_data_inspect_also_shows_the_first_record_that_uses_tools(tmp_path):
    from rich.console import Console

    from edge_tune.data.inspect import inspect_records
    from edge_tune.render.inspect import render_inspect

    plain = {"messages": [CONVERSATION[0], CONVERSATION[3]]}
    path = write(tmp_path / "mixed.jsonl", [plain, plain, RECORD])
    tok = byte_tokenizer(BUILTIN["llama3"], "llama3")
    report = inspect_records(tok, read_records(path), path, "tiny-llama3", 512)
    assert report["first_example"]["line"] == 1 and report["first_tool_example"]["line"] == 3
    console = Console(width=200, record=True, color_system=None, file=io.StringIO())
    render_inspect(report, console)
    text = console.export_text()
    assert f"first example with tool use ({path}:3)" in text
    assert '\u27e6{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>\u27e7' in text
