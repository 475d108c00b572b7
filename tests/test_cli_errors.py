"""Bad input -> one line naming the problem, exit code 2, no traceback, never a crash."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, run_cli
from gguf_helpers import q_pair, write_adapter


def test_missing_data_file(tmp_path):
    proc = run_cli("train", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "r"))
    assert_one_line_error(proc, "nope.jsonl", "no such data file")


def test_malformed_jsonl_names_the_line(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "a"},
                                    {"role": "assistant", "content": "b"}]})
    data = tmp_path / "bad.jsonl"
    data.write_text(f"{good}\n{good}\n{{not json\n")
    proc = run_cli("train", "--data", str(data), "--out", str(tmp_path / "r"))
    assert_one_line_error(proc, "bad.jsonl:3:", "invalid JSON")
    assert not (tmp_path / "r").exists()


def test_empty_dataset(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    assert_one_line_error(run_cli("train", "--data", str(data)), "empty dataset")


@pytest.mark.parametrize("model,needle", [
    ("not a model!", "not a hub ID"),
    ("./missing/dir", "no such file or directory"),
])
def test_bad_model_spec(tmp_path, demo_jsonl, model, needle):
    proc = run_cli("train", "--data", str(demo_jsonl), "--model", model, cwd=tmp_path)
    assert_one_line_error(proc, needle)


def test_model_file_that_is_not_gguf(tmp_path, demo_jsonl):
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    assert_one_line_error(run_cli("train", "--data", str(demo_jsonl), "--model", str(f)),
                          "not a GGUF file")


def test_bad_flag_values(tmp_path, demo_jsonl):
    assert_one_line_error(run_cli("train", "--data", str(demo_jsonl), "--lr", "5"), "lr")
    toml = tmp_path / "run.toml"
    toml.write_text("rnak = 8\n")
    assert_one_line_error(run_cli("train", "--data", str(demo_jsonl), "--config", str(toml)),
                          "unknown key 'rnak'")


def test_adapter_with_wrong_arch(tmp_path):
    bad = write_adapter(tmp_path / "qwen.gguf", "qwen2", q_pair())
    assert_one_line_error(run_cli("chat", "--adapter", str(bad), "--prompt", "hi"),
                          "architecture 'qwen2' does not match")


def test_adapter_with_wrong_shapes(tmp_path):
    bad = write_adapter(tmp_path / "shape.gguf", "llama", q_pair(n_in=100))
    assert_one_line_error(run_cli("chat", "--adapter", str(bad), "--prompt", "hi"),
                          "blk.0.attn_q.weight", "do not fit")


def test_truncated_adapter_and_base(tmp_path, default_gguf):
    good = write_adapter(tmp_path / "a.gguf", "llama", q_pair())
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-1000])
    assert_one_line_error(run_cli("chat", "--adapter", str(cut), "--prompt", "hi"),
                          "cut.gguf", "truncated or corrupt")
    base = tmp_path / "base.gguf"
    with open(default_gguf, "rb") as f:
        base.write_bytes(f.read(20_000_000))
    assert_one_line_error(run_cli("chat", "--base", str(base), "--prompt", "hi"),
                          "truncated or corrupt")


def test_export_of_something_that_is_not_an_adapter(tmp_path):
    assert_one_line_error(run_cli("export", str(tmp_path)), "neither an edge-tune run")
    assert_one_line_error(run_cli("export", str(tmp_path / "nope")), "no such adapter")
