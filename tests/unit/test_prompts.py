"""GRPO's prompt records (edge_tune.data.prompts): every prompt shape, the columns kept for the
rewards, and one-line refusals."""

from __future__ import annotations

import json

import pytest

from edge_tune.data.prompts import prompt_messages, read_prompts
from edge_tune.errors import DataError

USER = {"role": "user", "content": "2 + 2?"}


@pytest.mark.parametrize("record,want", [
    ({"prompt": "2 + 2?"}, [USER]),
    ({"prompt": [USER]}, [USER]),
    ({"messages": [{"role": "system", "content": "Be brief."}, USER]},
     [{"role": "system", "content": "Be brief."}, USER]),
    ({"conversations": [{"from": "human", "value": "2 + 2?"}]}, [USER]),
    ({"instruction": "2 + 2?"}, [USER]),
    ({"instruction": "Add", "input": "2 + 2"}, [{"role": "user", "content": "Add\n\n2 + 2"}]),
    ({"prompt": "2 + 2?", "system": "Be brief."},
     [{"role": "system", "content": "Be brief."}, USER]),
])
def test_prompt_shapes(record, want):
    messages, _ = prompt_messages(record, "f:1")
    assert [{k: m[k] for k in ("role", "content")} for m in messages] == want


def test_columns_are_kept_and_counted(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a", "answer": "1", "id": 1}, {"prompt": "b", "answer": "2"}]))
    got = read_prompts(str(f))
    assert [r["columns"] for r in got.records] == [{"answer": "1", "id": 1}, {"answer": "2"}]
    assert dict(got.columns) == {"answer": 2, "id": 1}
    assert got.records[0]["where"].endswith(":1")


@pytest.mark.parametrize("record,needle", [
    ({"messages": [USER, {"role": "assistant", "content": "4"}]}, "ends with an assistant"),
    ({"answer": "4"}, "no prompt"),
    ({"prompt": []}, "non-empty list"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "conversations\\[0\\]"),
])
def test_bad_records_are_one_line(record, needle):
    with pytest.raises(DataError, match=needle):
        prompt_messages(record, "f:1")


def test_skip_invalid(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"answer": 1}) + "\n" + json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(DataError, match="no prompt"):
        read_prompts(str(f))
    got = read_prompts(str(f), skip_invalid=True)
    assert len(got.records) == 1 and got.skipped[0][0] == 1
