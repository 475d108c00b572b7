"""Every data shape in every container becomes chat messages; a bad record is one FILE:LINE line."""

from __future__ import annotations

import csv
import json
import sys
import types

import pytest

from edge_tune.data.formats import Record, read_jsonl, read_records
from edge_tune.errors import EdgeTuneError

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]
# format -> (one record of it, what it normalises to)
SAMPLES = {
    "openai": ({"messages": CHAT}, CHAT),
    "sharegpt": ({"conversations": [{"from": "human", "value": "Hi"},
                                    {"from": "gpt", "value": "Arr!"}]}, CHAT),
    "alpaca": ({"instruction": "Hi", "input": "", "output": "Arr!"}, CHAT),
    "completion": ({"prompt": "Hi", "completion": "Arr!"}, CHAT),
    "text": ({"text": "Arr, a tale."}, "Arr, a tale."),
}
FORMATS = sorted(SAMPLES)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path, records):
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def write_csv(path, records):
    # Conversations go into a cell as JSON text, as a spreadsheet export would hold them.
    cols = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in records:
            w.writerow([json.dumps(r[c]) if isinstance(r.get(c), list) else r.get(c, "")
                        for c in cols])
    return path


WRITERS = {"jsonl": write_jsonl, "json": write_json, "csv": write_csv}


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(EdgeTuneError) as exc:
        call(*args, **kwargs)
    message = str(exc.value)
    assert "\n" not in message and len(message.splitlines()) == 1, message
    return message


def assert_error(prefix: str, contains: str, call, *args, **kwargs):
    message = error_of(call, *args, **kwargs)
    assert message.startswith(prefix), message
    assert contains in message, message


def normalised(record: Record):
    return record.text if record.messages is None else record.messages


# ---- every format in every container ---------------------------------------------------------

@pytest.mark.parametrize("container", ["jsonl", "json", "csv"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_in_each_container(tmp_path, fmt, container):
    record, expected = SAMPLES[fmt]
    path = WRITERS[container](tmp_path / f"d.{container}", [record, record, record])
    result = read_records(path)
    assert result.format == fmt and result.skipped == []
    assert [normalised(r) for r in result.records] == [expected] * 3
    assert all(r.source == str(path) for r in result.records)
    # Lines: file lines for .jsonl and .csv (the header is line 1), record indexes for .json.
    assert [r.line for r in result.records] == {"jsonl": [1, 2, 3], "csv": [2, 3, 4],
                                                "json": [1, 2, 3]}[container]
    assert (result.records[0].text is None) == (fmt != "text")


def test_directory_reads_every_data_file_sorted_each_with_its_format(tmp_path):
    for i, fmt in enumerate(FORMATS):
        container = ["jsonl", "json", "csv"][i % 3]
        WRITERS[container](tmp_path / f"{i}-{fmt}.{container}", [SAMPLES[fmt][0]])
    (tmp_path / "9-notes.txt").write_text("First paragraph,\nstill first.\n\n\nSecond.\n")
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / ".hidden.jsonl").write_text("broken")
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "deeper.jsonl", [{"broken": 1}])  # not recursive
    result = read_records(tmp_path)
    assert result.format == "mixed"
    assert [normalised(r) for r in result.records] == \
        [SAMPLES[f][1] for f in FORMATS] + ["First paragraph,\nstill first.", "Second."]
    assert [r.source.rsplit("/", 1)[-1] for r in result.records][-2:] == ["9-notes.txt"] * 2
    assert [r.line for r in result.records][-2:] == [1, 5]
    assert result.formats[str(tmp_path / "9-notes.txt")] == "text"
    assert result.formats[str(tmp_path / "0-alpaca.jsonl")] == "alpaca"
    # One format throughout: the directory reports it.
    one = tmp_path / "one"
    one.mkdir()
    write_jsonl(one / "a.jsonl", [SAMPLES["alpaca"][0]])
    write_csv(one / "b.csv", [SAMPLES["alpaca"][0]])
    assert read_records(one).format == "alpaca"


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    rows = [SAMPLES["alpaca"][0], {"instruction": "Why?", "input": None, "output": "Arr."},
            {"instruction": "Bad", "input": "x", "output": ""}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert_error(f"{path}:#3: ", "'output' is empty", read_records, path)
    result = read_records(path, skip_invalid=True)
    assert result.format == "alpaca" and [r.line for r in result.records] == [1, 2]
    assert result.records[1].messages[0] == {"role": "user", "content": "Why?"}
    # Nested columns: absent struct fields come back as null and are not passed through.
    chat = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([SAMPLES["openai"][0]]), chat)
    assert read_records(chat).records[0].messages == CHAT
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    assert_error(f"{tmp_path / 'bad.parquet'}: cannot read Parquet file", "",
                 read_records, tmp_path / "bad.parquet")


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    assert_error(f"{path}: ", "pip install pyarrow", read_records, path)


# ---- shape details ---------------------------------------------------------------------------

def test_alpaca_input_and_system(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Translate", "input": "hello", "output": "ahoy", "system": "Be a pirate."},
        {"instruction": "Greet", "input": "   ", "output": "Arr"}])
    a, b = read_records(path).records
    assert a.messages == [{"role": "system", "content": "Be a pirate."},
                          {"role": "user", "content": "Translate\n\nhello"},
                          {"role": "assistant", "content": "ahoy"}]
    assert b.messages == [{"role": "user", "content": "Greet"},
                          {"role": "assistant", "content": "Arr"}]


def test_sharegpt_roles(tmp_path):
    turns = [{"from": "system", "value": "S"}, {"from": "human", "value": "U1"},
             {"from": "gpt", "value": "A1"}, {"from": "user", "value": "U2"},
             {"from": "assistant", "value": "A2"}]
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": turns}])
    assert [m["role"] for m in read_records(path).records[0].messages] == \
        ["system", "user", "assistant", "user", "assistant"]


def test_openai_tool_calls_pass_through(tmp_path):
    call = {"id": "c1", "type": "function", "function": {"name": "sum", "arguments": "{}"}}
    messages = [{"role": "user", "content": "Add"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "3", "tool_call_id": "c1", "name": "sum"},
                {"role": "assistant", "tool_calls": [call]},  # no content key at all
                {"role": "assistant", "content": "It be 3.", "weight": 1}]
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": messages}])
    got = read_records(path).records[0].messages
    # OpenAI's JSON-string arguments become the object HF chat templates expect.
    parsed = {**call, "function": {"name": "sum", "arguments": {}}}
    assert got[1] == {"role": "assistant", "content": None, "tool_calls": [parsed]}
    assert got[2] == {"role": "tool", "content": "3", "tool_call_id": "c1", "name": "sum"}
    assert got[3] == {"role": "assistant", "content": None, "tool_calls": [parsed]}
    assert got[4] == {"role": "assistant", "content": "It be 3."}  # weight 1: the default


@pytest.mark.parametrize("message,contains", [
    ({"role": "assistant", "content": None}, "missing field 'content'"),
    ({"role": "assistant"}, "missing field 'content'"),
    ({"content": "x"}, "missing field 'role' (found keys: content;"),
    ({"role": "user", "content": None, "tool_calls": [{"id": "c"}]}, "'tool_calls' must be"),
    ({"role": "assistant", "tool_calls": []}, "'tool_calls' must be a non-empty list"),
    ({"role": "tool", "content": "3", "tool_call_id": 7}, "'tool_call_id' must be a string"),
])
def test_openai_tool_rules(tmp_path, message, contains):
    path = write_jsonl(tmp_path / "t.jsonl", [SAMPLES["openai"][0], {"messages": [
        {"role": "user", "content": "x"}, message, {"role": "assistant", "content": "y"}]}])
    assert_error(f"{path}:2: messages[1]: ", contains, read_records, path)


def test_fmt_override_and_detection(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [SAMPLES["completion"][0]])
    assert read_records(path).format == "completion"
    assert read_records(path, fmt="completion").format == "completion"
    assert_error(f"{path}:1: ", "missing field 'instruction' (found keys: completion, prompt; "
                 'expected {"instruction"', read_records, path, fmt="alpaca")
    # A plain-text file read as a chat format: every block lacks the chat fields.
    txt = tmp_path / "t.txt"
    txt.write_text("\n\nsome prose\n")
    assert_error(f"{txt}:3: ", "missing field 'messages'", read_records, txt, fmt="openai")
    assert_error("unknown data format 'yaml'", "expected one of auto, openai", read_records,
                 path, fmt="yaml")


def test_json_file_holding_json_lines_and_bom_and_crlf(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(SAMPLES["text"][0]).encode() + b"\r\n" +
                     json.dumps(SAMPLES["text"][0]).encode() + b"\r\n")
    result = read_records(path)
    assert result.format == "text" and [r.line for r in result.records] == [1, 2]
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfprompt,completion\r\nHi,Arr!\r\n")
    assert read_records(csv_path).records[0].messages == CHAT


def test_read_jsonl_keeps_its_contract(tmp_path):
    path = write_jsonl(tmp_path / "d.data", [SAMPLES["openai"][0]])  # any suffix, as before
    assert read_jsonl(path)[0] == Record(CHAT, 1, source=str(path), where=f"{path}:1")
    other = write_jsonl(tmp_path / "a.jsonl", [SAMPLES["alpaca"][0]])  # openai only, as before
    assert_error(f"{other}:1: ", "missing field 'messages'", read_jsonl, other)


# ---- every error kind, with its exact FILE:LINE prefix -----------------------------------------

GOOD = json.dumps(SAMPLES["openai"][0])


@pytest.mark.parametrize("line,prefix,contains", [
    ('{"messages": [', ":2: ", "invalid JSON (Expecting value at column 15)"),
    ('[1, 2]', ":2: ", "expected a JSON object, got array"),
    ('{"conversations": []}', ":2: ", "record is ShareGPT but this file is OpenAI chat "
                                      "(detected at "),
    ('{"prompt": "a", "completion": "b"}', ":2: ", "record is prompt/completion"),
    ('{"foo": 1}', ":2: ", "missing field 'messages' (found keys: foo;"),
    ('{"messages": {}}', ":2: ", "'messages' must be a non-empty list, got object"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', ":2: messages[0]: ",
     "unknown role 'robot' (expected one of system, user, assistant, tool)"),
    ('{"messages": [{"role": "user", "content": 3}]}', ":2: messages[0]: ",
     "'content' must be a string, got number"),
    ('{"messages": [{"role": "user", "content": " "}]}', ":2: messages[0]: ", "'content' is empty"),
    ('{"messages": [{"role": "user", "content": "x"}]}', ":2: ",
     "conversation has no assistant turn"),
])
def test_openai_errors(tmp_path, line, prefix, contains):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD + "\n" + line + "\n" + GOOD + "\n")
    assert_error(f"{path}{prefix}", contains, read_records, path)


@pytest.mark.parametrize("fmt,bad,prefix,contains", [
    ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, ":3: conversations[0]: ",
     "unknown 'from' value 'bot' (expected one of human, user, gpt, assistant, system, "
     "function_call, observation)"),
    ("sharegpt", {"conversations": [{"value": "x"}]}, ":3: conversations[0]: ",
     "missing field 'from'"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "x"}]}, ":3: ",
     "conversation has no assistant turn"),
    ("sharegpt", {"conversations": ["hi"]}, ":3: conversations[0]: ",
     "expected an object with 'from' and 'value', got string"),
    ("alpaca", {"instruction": "x"}, ":3: ", "missing field 'output' (found keys: instruction;"),
    ("alpaca", {"instruction": "x", "input": 5, "output": "y"}, ":3: ",
     "'input' must be a string, got number"),
    ("alpaca", {"instruction": "", "output": "y"}, ":3: ", "'instruction' is empty"),
    ("completion", {"prompt": ["x"], "completion": "y"}, ":3: ", "prompt[0]: expected an "
                                                                 "object with 'role'"),
    ("completion", {"prompt": "x"}, ":3: ", "missing field 'completion'"),
    ("text", {"text": None}, ":3: ", "missing field 'text'"),
    ("text", {"text": "\n"}, ":3: ", "'text' is empty"),
])
def test_other_format_errors(tmp_path, fmt, bad, prefix, contains):
    good = SAMPLES[fmt][0]
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, bad])
    assert_error(f"{path}{prefix}", contains, read_records, path)


def test_unknown_shape_lists_the_recognised_shapes(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    message = error_of(read_records, path)
    assert message.startswith(f"{path}:1: unknown record shape (found keys: answer, question; "
                              "expected one of ")
    for shape in ('{"messages"', '{"conversations"', '{"instruction"', '{"prompt"', '{"text"'):
        assert shape in message


def test_errors_in_json_csv_and_txt_containers(tmp_path):
    j = write_json(tmp_path / "d.json", [SAMPLES["text"][0], SAMPLES["text"][0], {"text": 1}])
    assert_error(f"{j}:#3: ", "'text' must be a string", read_records, j)
    j.write_text('[\n{"text": "a"},\n{"text": }\n]')
    assert_error(f"{j}:3: ", "invalid JSON (Expecting value", read_records, j)
    j.write_text('{"data": []}')
    assert_error(f"{j}: ", "expected a JSON array of records at the top level, got object",
                 read_records, j)
    c = tmp_path / "d.csv"
    c.write_text('instruction,input,output\nA,,B\n"multi\nline",,C\nD,E\n')
    assert_error(f"{c}:5: ", "expected 3 cells (header: instruction, input, output), got 2",
                 read_records, c)
    c.write_text('messages\n"[{""role"": ""user""}"\n')
    assert_error(f"{c}:2: ", "invalid JSON in column 'messages'", read_records, c)


@pytest.mark.parametrize("name,data,prefix", [
    ("d.jsonl", GOOD.encode() + b"\n\n" + b'{"text": "caf\xe9"}\n', ":3: "),
    ("d.csv", b"prompt,completion\nHi,Arr\n\nHi,caf\xe9\n", ":4: "),
    ("d.json", b'[\n{"text": "a"},\n{"text": "\xff"}\n]', ":3: "),
    ("d.txt", b"para\n\n\xc3(\n", ":3: "),
])
def test_non_utf8_byte_names_its_line(tmp_path, name, data, prefix):
    path = tmp_path / name
    path.write_bytes(data)
    assert_error(f"{path}{prefix}", "not UTF-8 text (byte 0x", read_records, path)


@pytest.mark.parametrize("name,text", [
    ("d.jsonl", ""), ("d.jsonl", "\n  \n"), ("d.json", "[]"), ("d.json", " "),
    ("d.csv", "prompt,completion\n"), ("d.txt", "\n\n"), ("d.parquet", ""),
])
def test_empty_dataset(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert error_of(read_records, path) == f"{path}: empty dataset (no records)"


def test_missing_unsupported_and_empty_directory(tmp_path):
    assert_error(f"{tmp_path / 'no.jsonl'}: no such data file", "", read_records,
                 tmp_path / "no.jsonl")
    (tmp_path / "d.xlsx").write_bytes(b"PK")
    assert_error(f"{tmp_path / 'd.xlsx'}: unsupported file type '.xlsx'", ".jsonl", read_records,
                 tmp_path / "d.xlsx")
    assert_error(f"{tmp_path}: no data files in this directory", "", read_records, tmp_path)
    # In a directory an empty file is an error too: it is probably a failed export.
    write_jsonl(tmp_path / "a.jsonl", [SAMPLES["text"][0]])
    (tmp_path / "b.jsonl").write_text("")
    assert error_of(read_records, tmp_path) == f"{tmp_path / 'b.jsonl'}: empty dataset (no records)"


# ---- skip_invalid ----------------------------------------------------------------------------

def test_skip_invalid_collects_bad_lines_and_keeps_going(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join([GOOD.encode(), b"{oops", GOOD.encode(), b'{"text": "x"}',
                                 b"\xff", GOOD.encode(), b'{"messages": []}']) + b"\n")
    assert error_of(read_records, path).startswith(f"{path}:2: invalid JSON")
    result = read_records(path, skip_invalid=True)
    assert [r.line for r in result.records] == [1, 3, 6]
    assert [line for line, _ in result.skipped] == [2, 4, 5, 7]
    assert all(msg.startswith(f"{path}:{line}: ") for line, msg in result.skipped)
    assert "not UTF-8" in result.skipped[2][1]


def test_skip_invalid_still_needs_one_valid_record(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n[]\n')
    message = error_of(read_records, path, skip_invalid=True)
    assert message.startswith(f"{path}: empty dataset (no records) - all 2 were invalid; "
                              f"first: {path}:1: unknown record shape")


def test_skip_invalid_detects_format_from_first_valid_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"junk": 1}, {"text": 5}, SAMPLES["alpaca"][0],
                                              SAMPLES["text"][0], SAMPLES["alpaca"][0]])
    result = read_records(path, skip_invalid=True)
    assert result.format == "alpaca" and [r.line for r in result.records] == [3, 5]
    assert [line for line, _ in result.skipped] == [1, 2, 4]
    assert "'text' must be a string" in result.skipped[1][1]
    assert f"record is plain text but this file is Alpaca (detected at {path}:3;" \
        in result.skipped[2][1]


# ---- hub dataset IDs: never the network -------------------------------------------------------

def test_hub_id_without_datasets_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)
    message = error_of(read_records, "some-org/some-data")
    assert message.startswith("some-org/some-data: no such file or directory")
    assert "pip install datasets" in message
    # A path-looking name that is not there stays a missing file, never a hub lookup.
    assert error_of(read_records, "some-org/data.jsonl") == \
        "some-org/data.jsonl: no such data file"


def test_hub_id_loads_through_datasets(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        if name == "org/offline":
            raise ConnectionError("Couldn't reach the hub\nsecond line")
        return [SAMPLES["completion"][0], {"prompt": "x"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    result = read_records("org/name", skip_invalid=True)
    assert calls == [("org/name", "train")]
    assert result.format == "completion" and result.records[0].messages == CHAT
    assert result.records[0].source == "org/name"
    assert result.skipped == [(2, "org/name:#2: missing field 'completion' (found keys: prompt; "
                                  'expected {"prompt": ..., "completion": ...})')]
    message = error_of(read_records, "org/offline")  # not cached, online: the hub failed
    assert message.startswith("org/offline: not in the Hugging Face cache (")
    assert message.endswith("and the hub could not load it (ConnectionError: Couldn't reach "
                            "the hub); fetch it once with `hf download --repo-type dataset "
                            "org/offline`")


# ---- fuzz: a malformed record on line K always gives FILE:K, as one line ------------------------

def test_fuzz_malformed_record_on_line_k(tmp_path_factory):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"

    def bad_json(text: str) -> bool:
        try:
            json.loads(text)
        except Exception:  # noqa: BLE001 - any parse failure counts as broken
            return True
        return False

    def bad_utf8(data: bytes) -> bool:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False

    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | \
        st.text(max_size=8)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                          st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=10)
    keys = st.sampled_from(["messages", "conversations", "instruction", "input", "output",
                            "prompt", "completion", "text", "system", "role", "content", "from",
                            "value", "tool_calls"]) | st.text(max_size=8)
    # Neither a string nor a list: every format needs one of those in a required field.
    wrong = st.none() | st.booleans() | st.integers() | st.floats() | \
        st.dictionaries(st.text(max_size=4), scalars, max_size=2)
    turn = st.sampled_from(CHAT)
    bad_turn = st.sampled_from([
        {"role": "robot", "content": "x"}, {"role": "user", "content": ""}, {"role": "user"},
        {"role": "user", "content": 3}, {"role": "user", "content": "x", "tool_calls": [{}]},
        {"role": "assistant", "content": None}, {"content": "x"}, {"role": ["user"]},
        {"role": "assistant", "tool_calls": "call"}, "user", 5, None, []])
    text_line = st.text(st.characters(blacklist_categories=("Cs",),
                                      blacklist_characters="\n\ufeff"), min_size=1, max_size=30)

    @st.composite
    def case(draw):
        fmt = draw(st.sampled_from(FORMATS))
        k = draw(st.integers(1, 5))
        kind = draw(st.sampled_from(["text", "cut", "bytes", "value", "dict", "turns",
                                     "no_assistant", "other"]))
        if kind == "text":  # random text that is not JSON
            line = draw(text_line.filter(lambda s: s.strip() and bad_json(s))).encode()
        elif kind == "cut":  # a valid record cut short
            whole = json.dumps(SAMPLES[draw(st.sampled_from(FORMATS))][0])
            line = whole[:draw(st.integers(1, len(whole) - 1))].encode()
        elif kind == "bytes":  # not UTF-8
            line = draw(st.binary(min_size=1, max_size=20).filter(
                lambda b: b"\n" not in b and bad_utf8(b)))
        elif kind == "value":  # JSON, but not an object
            line = json.dumps(draw(values.filter(lambda v: not isinstance(v, dict)))).encode()
        elif kind == "dict":  # known and unknown keys, values of the wrong type
            line = json.dumps(draw(st.dictionaries(keys, wrong, max_size=5))).encode()
        elif kind == "turns":  # one broken message among good ones
            msgs = draw(st.lists(turn, max_size=2)) + [draw(bad_turn)] + \
                draw(st.lists(turn, max_size=2))
            line = json.dumps({"messages": msgs}).encode()
        elif kind == "no_assistant":
            line = json.dumps({"conversations": [{"from": "human", "value": "x"}] *
                               draw(st.integers(1, 3))}).encode()
        else:  # a valid record of another format than the file's
            k = max(k, 2)
            other = draw(st.sampled_from([f for f in FORMATS if f != fmt]))
            line = json.dumps(SAMPLES[other][0]).encode()
        return fmt, k, line

    @hypothesis.settings(max_examples=1000, deadline=None, database=None,
                         suppress_health_check=[hypothesis.HealthCheck.too_slow,
                                                hypothesis.HealthCheck.filter_too_much])
    @hypothesis.given(case())
    def check(c):
        fmt, k, line = c
        good = json.dumps(SAMPLES[fmt][0]).encode()
        path.write_bytes(b"\n".join([good] * (k - 1) + [line, good]) + b"\n")
        message = error_of(read_records, path)  # EdgeTuneError only: anything else fails
        assert message.startswith(f"{path}:{k}: "), (message, line)
        # The same line is what skip_invalid skips; everything else still reads.
        result = read_records(path, skip_invalid=True)
        assert result.skipped == [(k, message)]
        assert [r.line for r in result.records] == list(range(1, k)) + [k + 1]
        # Through the command line: that line, exit code 2, nothing else on stderr.
        code, err = run_main(["train", "--data", str(path), "--out", str(path.parent / "run")])
        assert (code, err) == (2, f"error: {message}\n"), (code, err)
        assert not (path.parent / "run").exists()

    check()


def run_main(argv: list[str]) -> tuple[int, str]:
    """``edge-tune ARGV`` in this process: (exit code, stderr)."""
    import contextlib
    import io
    import sys

    from edge_tune import cli

    buf, saved = io.StringIO(), sys.argv
    sys.argv = ["edge-tune", *argv]
    try:
        with contextlib.redirect_stderr(buf):
            cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = saved
    return code, buf.getvalue()
