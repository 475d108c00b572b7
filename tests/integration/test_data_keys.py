"""Data read as its author meant it: every key of a record is used or named.

The layouts of public datasets and other tools that edge-tune used to misread silently (issue
25), each with its own input: ultrafeedback's prompt + whole conversations, tools on preference
records, Arrow's nulls, LLaMA-Factory's history / ShareGPT system, KTO labels, TRL's
conversational prompt-completion, and keys nobody knows. Rendered with three real templates:
the default model's (ChatML with a default system prompt), qwen2's and qwen3's (reasoning).
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.cli import assert_one_line_error, run_cli
from edge_tune.data.formats import read_records
from edge_tune.errors import EdgeTuneError

Q = "Which planet has the most moons?"
GOOD, BAD = "Saturn, with 146 known moons.", "The Moon."
USER = {"role": "user", "content": Q}
TOOLS = [{"type": "function", "function": {
    "name": "lookup_moons", "description": "Count a planet's moons",
    "parameters": {"type": "object", "properties": {"planet": {"type": "string"}}}}}]


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def one_line(call, *args, **kw) -> str:
    with pytest.raises(EdgeTuneError) as exc:
        call(*args, **kw)
    message = str(exc.value)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module", params=["default", "qwen2", "qwen3"])
def tok(request, tiny_hf):
    """The tokenizer and chat template of the default model (the tiny copy shares them) and
    of two tiny families."""
    from transformers import AutoTokenizer

    from tests.helpers.tiny_families import family_hf

    where = tiny_hf if request.param == "default" else family_hf(request.param)
    return AutoTokenizer.from_pretrained(str(where))


def encode(tok, record):
    from edge_tune.data.preference import encode_pair

    return encode_pair(tok, record.messages, record.rejected, tools=record.tools,
                       where=record.where)


# ---- preference: ultrafeedback's layout -----------------------------------------------------

def test_a_prompt_repeated_in_whole_conversations_is_rendered_once(tmp_path, tok):
    """HuggingFaceH4/ultrafeedback_binarized: text ``prompt`` *and* the whole conversation in
    chosen/rejected (plus a ``messages`` copy and scores). The question is rendered once per
    side: the same tokens as the answers-only layout."""
    whole = jsonl(tmp_path / "uf.jsonl", [{
        "prompt": Q, "prompt_id": "0f3a", "score_chosen": 9.0, "score_rejected": 2.0,
        "chosen": [USER, {"role": "assistant", "content": GOOD}],
        "rejected": [USER, {"role": "assistant", "content": BAD}],
        "messages": [USER, {"role": "assistant", "content": GOOD}]}])
    answers = jsonl(tmp_path / "answers.jsonl", [{"prompt": Q, "chosen": GOOD, "rejected": BAD}])
    read = read_records(whole)
    pair, plain = encode(tok, read.records[0]), encode(tok, read_records(answers).records[0])
    assert (pair.input_ids, pair.rejected_ids) == (plain.input_ids, plain.rejected_ids)
    for ids in (pair.input_ids, pair.rejected_ids):
        assert tok.decode(ids).count(Q) == 1
    assert read.ignored == {"prompt_id": 1, "score_chosen": 1, "score_rejected": 1}
    assert "messages" in read.keys_report()["used"]  # checked against chosen, not ignored


@pytest.mark.parametrize("record, needles", [
    ({"prompt": "What is 2+2?", "chosen": [USER, {"role": "assistant", "content": GOOD}],
      "rejected": [USER, {"role": "assistant", "content": BAD}]},
     ("'prompt' is not the conversation", "What is 2+2?")),
    ({"chosen": [USER, {"role": "assistant", "content": GOOD}],
      "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": BAD}]},
     ("share no leading messages",)),
    ({"prompt": Q, "chosen": [{"role": "assistant", "content": GOOD}],
      "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": BAD}]},
     ("start with different conversations", "rejected holds a user turn")),
    ({"prompt": Q, "chosen": GOOD, "rejected": BAD, "messages": [USER]},
     ("'messages' is not the chosen conversation",)),
    ({"prompt": Q, "chosen": GOOD, "rejected": GOOD}, ("same answer",)),
])
def test_preference_records_that_disagree_with_themselves_are_refused(tmp_path, record,
                                                                      needles):
    message = one_line(read_records, jsonl(tmp_path / "p.jsonl", [record]))
    assert message.startswith(f"{tmp_path / 'p.jsonl'}:1: ")
    for needle in needles:
        assert needle in message


def test_tools_on_preference_records_reach_the_template(tmp_path):
    """TRL's ``tools`` column and OpenAI's ``input.tools``: the schemas are rendered on both
    sides of the pair, as in an SFT record (qwen2 lists tools in its system turn)."""
    from transformers import AutoTokenizer

    from tests.helpers.tiny_families import family_hf

    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
        "name": "lookup_moons", "arguments": {"planet": "Saturn"}}}]}
    trl = {"prompt": [USER], "chosen": [call], "rejected": [{"role": "assistant",
                                                              "content": BAD}], "tools": TOOLS}
    openai = {"input": {"messages": [USER], "tools": TOOLS, "parallel_tool_calls": False},
              "preferred_output": [call],
              "non_preferred_output": [{"role": "assistant", "content": BAD}]}
    tok = AutoTokenizer.from_pretrained(str(family_hf("qwen2")))
    for name, record in (("trl", trl), ("openai", openai)):
        read = read_records(jsonl(tmp_path / f"{name}.jsonl", [record]))
        assert read.records[0].tools == TOOLS and not read.ignored
        pair = encode(tok, read.records[0])
        for ids in (pair.input_ids, pair.rejected_ids):
            assert '"name": "lookup_moons"' in tok.decode(ids) \
                and "Count a planet's moons" in tok.decode(ids)


def test_tools_a_template_cannot_render_are_refused_not_dropped(tmp_path, tiny_hf):
    from transformers import AutoTokenizer

    from edge_tune.data.template import RecordError

    tok = AutoTokenizer.from_pretrained(str(tiny_hf))  # the default model's ChatML: no tools
    record = read_records(jsonl(tmp_path / "t.jsonl", [{
        "prompt": Q, "chosen": GOOD, "rejected": BAD, "tools": TOOLS}])).records[0]
    with pytest.raises(RecordError, match=r"t.jsonl:1: the chat template does not render the "
                                          r"record's tools"):
        encode(tok, record)


# ---- Arrow / Parquet / HF datasets: null means absent ----------------------------------------

def test_nulls_that_arrow_fills_in_mean_absent(tmp_path, tok):
    """A Parquet file as HF ``datasets`` writes one: every struct carries the union of the
    keys, absent ones null (``weight`` on user turns, an argument only another call has)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"messages": [{"role": "user", "content": "Moons of Mars?"},
                      {"role": "assistant", "content": "Two.", "weight": 0},
                      {"role": "user", "content": "Names?"},
                      {"role": "assistant", "content": "Phobos and Deimos.", "weight": 1}],
         "id": "b"},
        {"messages": [{"role": "user", "content": Q},
                      {"role": "assistant", "content": GOOD, "weight": 1}]},
    ]
    calls = [{"messages": [USER, {"role": "assistant", "tool_calls": [{
        "type": "function", "function": {"name": "lookup_moons",
                                         "arguments": {"planet": "Saturn", "moon": None}}}]},
        {"role": "tool", "content": "146"}, {"role": "assistant", "content": GOOD}],
        "tools": TOOLS}]
    path = tmp_path / "chats.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    table = pq.read_table(path).to_pylist()
    assert table[1]["messages"][0]["weight"] is None and table[1]["id"] is None  # Arrow's fill
    read = read_records(path)
    assert all("weight" not in m for r in read.records for m in r.messages if m["role"] == "user")
    assert read.records[0].messages[1]["weight"] == 0 and read.ignored == {"id": 1}
    tool_path = tmp_path / "calls.parquet"
    pq.write_table(pa.Table.from_pylist(calls), tool_path)
    args = read_records(tool_path).records[0].messages[1]["tool_calls"][0]["function"]
    assert args["arguments"] == {"planet": "Saturn"}
    from edge_tune.data.template import encode_examples

    example = encode_examples(tok, read.records[0].messages)[-1]
    assert "Two." not in tok.decode([t for t in example.labels if t != -100])


# ---- LLaMA-Factory's Alpaca history, ShareGPT's record-level system --------------------------

def test_alpaca_history_and_sharegpt_system_are_rendered(tmp_path, tok):
    persona = "You are Captain Moonbeard, a pirate astronomer."
    alpaca = {"instruction": "And the most moons?", "input": "", "output": GOOD,
              "system": persona, "history": [["Largest planet?", "Jupiter."]]}
    share = {"system": persona, "conversations": [{"from": "human", "value": Q},
                                                  {"from": "gpt", "value": GOOD}]}
    from edge_tune.data.template import encode_examples, render_examples

    for name, record in (("alpaca", alpaca), ("sharegpt", share)):
        read = read_records(jsonl(tmp_path / f"{name}.jsonl", [record]))
        assert not read.ignored, read.ignored
        messages = read.records[0].messages
        assert messages[0] == {"role": "system", "content": persona}
        text = render_examples(tok, messages)[-1].text
        assert persona in text and "SmolLM" not in text  # not under the default system prompt
    history = read_records(jsonl(tmp_path / "h.jsonl", [alpaca])).records[0].messages
    assert [m["content"] for m in history[1:]] == ["Largest planet?", "Jupiter.",
                                                  "And the most moons?", GOOD]
    trained = encode_examples(tok, history)
    labels = " ".join(tok.decode([t for t in ex.labels if t != -100]) for ex in trained)
    assert "Jupiter." in labels and GOOD in labels  # LLaMA-Factory trains history answers


def test_sharegpt_tool_turns_and_schemas(tmp_path):
    """LLaMA-Factory's ShareGPT tool layout: ``tools`` as a JSON string, ``function_call`` and
    ``observation`` turns."""
    record = {"tools": json.dumps(TOOLS), "conversations": [
        {"from": "human", "value": Q},
        {"from": "function_call", "value": json.dumps({"name": "lookup_moons",
                                                       "arguments": {"planet": "Saturn"}})},
        {"from": "observation", "value": "146"}, {"from": "gpt", "value": GOOD}]}
    r = read_records(jsonl(tmp_path / "s.jsonl", [record])).records[0]
    assert r.tools == TOOLS
    assert [m["role"] for m in r.messages] == ["user", "assistant", "tool", "assistant"]
    assert r.messages[1]["tool_calls"][0]["function"] == {"name": "lookup_moons",
                                                          "arguments": {"planet": "Saturn"}}


# ---- KTO labels are never trained as good answers --------------------------------------------

KTO = [{"prompt": Q, "completion": GOOD, "label": True},
       {"prompt": Q, "completion": BAD, "label": False},
       {"prompt": "Moons of Mars?", "completion": "Two.", "label": True}]
KTO_TAG = [{"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": BAD}],
            "kto_tag": False},
           {"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": GOOD}],
            "kto_tag": True}]


@pytest.mark.parametrize("records", [KTO, KTO_TAG], ids=["trl-label", "llamafactory-kto_tag"])
def test_kto_data_is_refused_under_sft_in_one_line(tmp_path, records):
    data = jsonl(tmp_path / "kto.jsonl", records)
    assert read_records(data).kto == (2, 1) or read_records(data).kto == (1, 1)
    proc = run_cli("plan", "--data", str(data), "--model", "default", timeout=300)
    assert_one_line_error(proc, "KTO data", "--desirable-only")
    proc = run_cli("plan", "--data", str(data), "--method", "dpo", timeout=300)
    assert_one_line_error(proc, "--method dpo needs chosen/rejected pairs", "KTO data")


def test_desirable_only_trains_the_good_answers_and_says_how_many_went(tmp_path):
    from edge_tune.data.training import read_data
    from edge_tune.config import TrainConfig

    said = []
    cfg = TrainConfig(data=str(jsonl(tmp_path / "kto.jsonl", KTO)), desirable_only=True)
    result = read_data(cfg.data, cfg, said.append)
    assert [r.messages[-1]["content"] for r in result.records] == [GOOD, "Two."]
    assert result.undesirable_left_out == 1
    assert any("left out 1 undesirable" in e.message for e in said)


def test_labels_must_be_booleans(tmp_path):
    message = one_line(read_records, jsonl(tmp_path / "k.jsonl", [
        {"prompt": Q, "completion": GOOD, "label": "yes"}]))
    assert "'label' must be true" in message and "k.jsonl:1" in message


# ---- TRL's conversational prompt-completion --------------------------------------------------

def test_conversational_prompt_completion_trains_only_the_completion(tmp_path, tok):
    from edge_tune.data.template import encode_examples

    record = {"prompt": [{"role": "system", "content": "Be brief."}, USER,
                         {"role": "assistant", "content": "Let me think."},
                         {"role": "user", "content": "Just the planet?"}],
              "completion": [{"role": "assistant", "content": "Saturn."}]}
    messages = read_records(jsonl(tmp_path / "pc.jsonl", [record])).records[0].messages
    assert messages[2]["weight"] == 0 and messages[-1] == {"role": "assistant",
                                                           "content": "Saturn."}
    trained = [tok.decode([t for t in ex.labels if t != -100])
               for ex in encode_examples(tok, messages)]
    assert any("Saturn." in t for t in trained) and not any("Let me think" in t for t in trained)


# ---- unknown and unsupported keys ------------------------------------------------------------

def test_unknown_keys_are_named_once_and_known_ones_say_where_they_went(tmp_path):
    records = [{"id": i, "source": "web", "messages": [
        {**USER, "id": f"m{i}"}, {"role": "assistant", "content": GOOD}]} for i in range(3)]
    read = read_records(jsonl(tmp_path / "c.jsonl", records))
    assert read.ignored == {"id": 3, "source": 3, "messages[].id": 3}
    assert read.ignored_line() == "ignored keys: id (3 records), source (3), messages[].id (3)"
    used = read.keys_report()["used"]
    assert used["messages"] == {"records": 3, "to": "the conversation"}


@pytest.mark.parametrize("record, needles", [
    ({"messages": [USER, {"role": "assistant", "content": GOOD}], "images": ["moon.png"]},
     ("'images' holds image inputs", "text-only")),
    ({"messages": [USER, {"role": "assistant", "content": GOOD}], "output": "x"},
     ("'output' is a key of the Alpaca format", "OpenAI chat")),
    ({"messages": [USER, {"role": "assistant", "content": GOOD}], "prompt": "Another?"},
     ("'prompt' is not the conversation's first user turn",)),
    ({"system": "A", "messages": [{"role": "system", "content": "B"}, USER,
                                  {"role": "assistant", "content": GOOD}]},
     ("'system' and the conversation's own system message differ",)),
    ({"instruction": Q, "output": GOOD, "history": [["only one"]]},
     ("history[0]: expected a pair",)),
])
def test_keys_with_a_meaning_that_cannot_be_honoured_are_refused(tmp_path, record, needles):
    message = one_line(read_records, jsonl(tmp_path / "u.jsonl", [record]))
    assert message.startswith(f"{tmp_path / 'u.jsonl'}:1: ")
    for needle in needles:
        assert needle in message


def test_ultrachat_prompt_copy_is_checked_not_ignored(tmp_path):
    record = {"prompt": Q, "prompt_id": "9", "messages": [USER, {"role": "assistant",
                                                                  "content": GOOD}]}
    read = read_records(jsonl(tmp_path / "uc.jsonl", [record]))
    assert read.ignored == {"prompt_id": 1} and "prompt" in read.keys_report()["used"]


def test_data_inspect_shows_ignored_keys_and_where_keys_went(tmp_path, tiny):
    data = jsonl(tmp_path / "c.jsonl", [{"id": 1, "source": "web", "system": "Be a pirate.",
                                         "conversations": [{"from": "human", "value": Q},
                                                           {"from": "gpt", "value": GOOD}]}])
    proc = run_cli("data", "inspect", str(data), "--model", str(tiny), "--seq-len", "64",
                   timeout=600)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "id (1 record), source (1)" in text
    assert "system -> a system message before the conversation" in text
    proc = run_cli("data", "inspect", str(data), "--model", str(tiny), "--json", timeout=600)
    report = json.loads(proc.stdout)
    assert report["keys"]["ignored"] == {"id": 1, "source": 1}


# ---- found by a fresh user's trial -----------------------------------------------------------

@pytest.mark.parametrize("record", [
    {"messages": [USER, {"role": "assistant", "content": GOOD}], "kto_tag": True},
    {"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": GOOD}],
     "label": True},
    {"instruction": Q, "output": GOOD, "label": False},
])
def test_kto_keys_are_read_on_every_sft_format(tmp_path, record):
    read = read_records(jsonl(tmp_path / "k.jsonl", [record]))
    assert not read.ignored and read.records[0].label is not None


def test_flat_tool_schemas_are_wrapped_as_templates_expect(tmp_path):
    """LLaMA-Factory's ShareGPT ``tools``: a JSON string of flat ``{"name", ...}`` schemas,
    wrapped as ``{"type": "function", "function": ...}`` as LLaMA-Factory wraps them."""
    flat = [TOOLS[0]["function"]]
    record = {"tools": json.dumps(flat), "conversations": [{"from": "human", "value": Q},
                                                           {"from": "gpt", "value": GOOD}]}
    assert read_records(jsonl(tmp_path / "f.jsonl", [record])).records[0].tools == TOOLS


def test_reasoning_given_twice_is_refused(tmp_path):
    message = one_line(read_records, jsonl(tmp_path / "r.jsonl", [{"messages": [USER, {
        "role": "assistant", "reasoning_content": "146 > 95",
        "content": "<think>\n146 > 95\n</think>\n\n" + GOOD}]}]))
    assert "the reasoning is given twice" in message and "r.jsonl:1" in message


def test_folder_roles_are_said_by_plan_and_inspect_and_val_split_wins(tmp_path, tiny):
    folder = tmp_path / "set"
    folder.mkdir()
    for name, n in (("train", 6), ("dev", 2), ("test", 2)):
        jsonl(folder / f"{name}.jsonl", [{"messages": [
            {"role": "user", "content": f"{name} {i}?"},
            {"role": "assistant", "content": f"{name} answer {i}."}]} for i in range(n)])
    proc = run_cli("plan", "--data", str(folder), "--model", str(tiny), "--val-split", "0.2",
                   timeout=300)
    assert proc.returncode == 0, proc.stderr
    err = " ".join(proc.stderr.split())
    assert "dev.jsonl: not used (--val-split gives the validation set)" in err
    assert "test.jsonl: left for `edge-tune eval`" in err
    proc = run_cli("data", "inspect", str(folder), "--model", str(tiny), "--max-samples", "3",
                   timeout=300)
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 0 and "dev.jsonl: validation" in err, proc.stderr
    assert "--max-samples 3" in err
    from edge_tune.data.layouts import data_spec, say_parts
    from edge_tune.data.readers import source_parts

    files = say_parts(source_parts(data_spec(str(folder))), lambda e: None, "--val-split")
    assert "valid" not in files and files["unused"] == [str((folder / "dev.jsonl").resolve())]
