"""GRPO's reward functions (edge_tune.training.rewards): each built-in, user functions with
TRL's signature, weights, None, and one-line errors."""

from __future__ import annotations

import json
import math

import pytest

from edge_tune.errors import UsageError
from edge_tune.training import rewards as rw

P = [[{"role": "user", "content": "q"}]]


def one(spec: str, text: str, **row) -> float:
    r = rw.parse_reward(spec)
    per, total = rw.score([r], P, [text], {k: [v] for k, v in row.items()})
    return per[0][0]


def test_regex_json_length():
    assert one(r"regex:^Answer: \d+$", "Answer: 12") == 1.0
    assert one(r"regex:^Answer: \d+$", "Answer: twelve") == 0.0
    assert one("json", '```json\n{"a": 1}\n```') == 1.0
    assert one("json", "{a: 1}") == 0.0
    assert one("length:10", "x" * 10) == 1.0
    assert one("length:10", "x" * 15) == 0.5
    assert one("length:10", "x" * 40) == 0.0


def test_exact_numeric_columns():
    assert one("exact:answer", "  Paris \n", answer="Paris") == 1.0
    assert one("exact:answer", "paris", answer="Paris") == 0.0
    assert one("numeric:answer", "so 3 + 4 = 7. Answer: 1,007", answer="1007") == 1.0
    assert one("numeric:answer", "Answer: 7.0", answer=7) == 1.0
    assert one("numeric:answer", "no number", answer=7) == 0.0


def test_json_schema(tmp_path):
    schema = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
              "properties": {"name": {"type": "string", "minLength": 1},
                             "age": {"type": "integer", "minimum": 0}}}
    f = tmp_path / "s.json"
    f.write_text(json.dumps(schema))
    spec = f"json-schema:{f}"
    assert one(spec, '{"name": "Ann", "age": 3}') == 1.0
    assert one(spec, '{"name": "Ann", "age": -3}') == 0.5
    assert one(spec, '{"name": "Ann"}') == 0.5
    assert one(spec, '{"name": "Ann", "age": 3, "x": 1}') == 0.5
    assert one(spec, "not json") == 0.0


def test_tool_call():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    ok = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert one("tool-call", ok, tools=tools) == 1.0
    assert one("tool-call", ok.replace("get_weather", "nope"), tools=tools) == 0.0
    assert one("tool-call", '{"name": "f", "arguments": "{\\"x\\": 1}"}') == 1.0
    assert one("tool-call", '{"name": "f"}') == 0.0
    assert one("tool-call", "I will not call anything") == 0.0


def test_user_function_trl_signature_weights_and_none(tmp_path):
    mod = tmp_path / "my_rewards.py"
    mod.write_text(
        "def short(prompts, completions, **kw):\n"
        "    assert kw['answer'] == ['1', '2']\n"
        "    assert completions[0][0]['role'] == 'assistant'\n"
        "    return [1.0 if len(c[0]['content']) < 3 else 0.0 for c in completions]\n"
        "def never(prompts, completions, **kw):\n"
        "    return [None] * len(completions)\n")
    rs = rw.parse_rewards([f"{mod}:short", "regex:b", f"{mod}:never"], [2.0, 0.5, 1.0])
    per, total = rw.score(rs, P * 2, ["ab", "aaaa"], {"answer": ["1", "2"]})
    assert per[0] == [1.0, 0.0] and per[1] == [1.0, 0.0]
    assert all(math.isnan(v) for v in per[2])
    assert total == [2.5, 0.0]
    r = rw.parse_reward(f"{mod}:never")
    assert math.isnan(rw.score([r], P, ["x"], {})[1][0])  # no function scored it


@pytest.mark.parametrize("spec,needle", [
    ("regex:(", "not a regular expression"), ("length:x", "length:N"),
    ("json:x", "takes no argument"), ("numeric", "needs an argument"),
    ("nosuchmodule_xyz:fn", "could not import"), ("os:no_such_fn", "has no function"),
    ("bogus", "unknown reward"), ("json-schema:/no/such.json", "no such file")])
def test_bad_specs_are_one_line(spec, needle):
    with pytest.raises(UsageError, match=needle):
        rw.parse_reward(spec)


def test_weights_count_and_columns():
    with pytest.raises(UsageError, match="2 weights for 1 rewards"):
        rw.parse_rewards(["json"], [1.0, 2.0])
    with pytest.raises(UsageError, match="at least one"):
        rw.parse_rewards([])
    with pytest.raises(UsageError, match="no record has a column 'answer'"):
        rw.check_columns(rw.parse_rewards(["exact:answer"]), {"id"})
    bad = rw.Reward("m:f", lambda prompts, completions, **kw: [1.0])
    with pytest.raises(UsageError, match="expected a list of 2"):
        rw.score([bad], P * 2, ["a", "b"], {})
