"""Chat records: clear errors for bad ones; loss masks derived from the model's template."""

from __future__ import annotations

import json

import pytest

from edge_tune.data.formats import read_jsonl
from edge_tune.data.template import IGNORE, encode
from edge_tune.errors import EdgeTuneError

GOOD = {"messages": [{"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Arr, matey! Hello."}]}


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("line,message", [
    ('{"messages": [', "d.jsonl:2: invalid JSON"),
    ('{"text": "x"}', "d.jsonl:2: missing field 'messages'"),
    ('{"messages": []}', "d.jsonl:2: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": 3}]}', "'content' must be a string"),
    ('{"messages": [{"role": "user", "content": "  "}]}', "'content' is empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_records_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path, [json.dumps(GOOD), line])
    with pytest.raises(EdgeTuneError, match=message.replace("[", r"\[").replace("(", r"\(")):
        read_jsonl(path)


def test_missing_empty_and_directory(tmp_path):
    with pytest.raises(EdgeTuneError, match="no such data file"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(EdgeTuneError, match="empty dataset"):
        read_jsonl(write(tmp_path, ["", "  "]))
    with pytest.raises(EdgeTuneError, match="is a directory"):
        read_jsonl(tmp_path)


def test_demo_data_is_valid(demo_jsonl):
    records = read_jsonl(demo_jsonl)
    assert 100 <= len(records) <= 300
    for r in records:
        for m in r.messages:
            if m["role"] == "assistant":
                assert m["content"].startswith("Arr, matey!")


def test_loss_only_on_assistant_turns_with_end_token(hf_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr, matey! One."},
            {"role": "user", "content": "More?"}, {"role": "assistant", "content": "Arr, matey! Two."}]
    ex = encode(tok, msgs, 512)
    trained = [t for t in ex.labels if t != IGNORE]
    text = tok.decode(trained)
    # Both assistant turns, each with its end-of-turn token; no prompt text, no role markers.
    assert text.count("Arr, matey!") == 2 and text.count("<|im_end|>") == 2
    assert "Hi" not in text and "More?" not in text and "user" not in text
    assert "assistant" not in text and "system" not in text
    # Truncation keeps the alignment of ids and labels.
    short = encode(tok, msgs, 16)
    assert len(short.input_ids) == len(short.labels) == 16


def test_plain_text_trains_on_every_token(hf_dir):
    from transformers import AutoTokenizer

    from edge_tune.data.template import encode_text

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    ex = encode_text(tok, "Pirates sail the seven seas.")
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tok.eos_token_id
    assert len(encode_text(tok, "word " * 100, seq_len=16).input_ids) == 16


def test_train_on_all_masks_nothing(hf_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    ex = encode(tok, GOOD["messages"], train_on_all=True)
    assert ex.labels == ex.input_ids


def test_overflow_truncate_or_drop(hf_dir):
    from transformers import AutoTokenizer

    from edge_tune.training.worker import tokenize_records

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    long = {"messages": [{"role": "user", "content": "word " * 80},
                         {"role": "assistant", "content": "Arr, matey! " * 20}]}
    short = {"messages": GOOD["messages"]}
    logs = []
    kept = tokenize_records(tok, [long, short], 120, logs.append, "training")
    assert len(kept) == 2 and len(kept[0].input_ids) == 120
    assert "1 example was longer than seq_len=120 and was truncated" in logs[-1].message
    logs.clear()
    kept = tokenize_records(tok, [long, short], 120, logs.append, "training", overflow="drop")
    assert len(kept) == 1 and "dropped (--overflow drop)" in logs[-1].message
