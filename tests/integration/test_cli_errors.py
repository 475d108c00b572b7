"""Bad input -> one line naming the problem, exit code 2, no traceback, never a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.cli import assert_one_line_error, run_cli, run_cli_in_process
from tests.helpers.gguf_helpers import q_pair, write_adapter


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


# --- runs built in seconds: a tiny random base, a LoRA run on it, a full run of it -------------

@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, default_gguf) -> dict:
    from tests.helpers.tiny_runs import make_tiny_runs

    return make_tiny_runs(tmp_path_factory.mktemp("tiny-runs"), default_gguf)


def test_full_run_in_a_chat_mix_or_compare_is_refused(tiny_runs):
    lora, full = str(tiny_runs["lora"]), str(tiny_runs["full"])
    proc = run_cli_in_process("chat", "--adapter", f"{full}=0.5", "--adapter", f"{lora}=0.5",
                              "--prompt", "hi")
    assert_one_line_error(proc, f"--adapter {full}:", "full fine-tuning run", "mixed")
    proc = run_cli_in_process("chat", "--adapter", lora, "--compare", full, "--prompt", "hi")
    assert_one_line_error(proc, f"--compare {full}:", "full fine-tuning run")


def test_full_run_as_base_of_an_adapter_names_base(tiny_runs):
    full = str(tiny_runs["full"])
    proc = run_cli_in_process("chat", "--base", full, "--adapter", str(tiny_runs["lora"]),
                              "--prompt", "hi")
    assert_one_line_error(proc, f"--base {full}:", "full fine-tuning run", "drop --base")


def test_verify_refuses_cut_peft_weights_before_loading(tiny_runs):
    proc = run_cli_in_process("verify", str(tiny_runs["peft"]))
    assert_one_line_error(proc, "adapter_model.safetensors: unreadable safetensors file")


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_serve_port_out_of_range_blames_port(tiny_runs, port):
    proc = run_cli_in_process("serve", "--base", str(tiny_runs["base"]), "--port", port)
    assert_one_line_error(proc, f"--port {port}: expected a TCP port from 1 to 65535")
    assert "serving" not in proc.stdout + proc.stderr


def test_bundle_to_an_unwritable_output_names_it(tiny_runs, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    out = not_a_folder / "bundle"
    proc = run_cli_in_process("bundle", str(tiny_runs["lora"]), "-o", str(out))
    assert_one_line_error(proc, f"-o {out}: cannot write into {not_a_folder}")
    if Path("/proc").is_dir():  # a folder nothing can be created in
        assert_one_line_error(run_cli_in_process("bundle", str(tiny_runs["lora"]), "-o",
                                                 "/proc/x"), "-o /proc/x: cannot write")


@pytest.mark.parametrize("args,needles", [
    (("train", "--dat", "x"), ["No such option: --dat (did you mean --data?)",
                               "train --help)"]),
    (("train", "--lr", "abc"), ["Invalid value for '--lr'", "train --help)"]),
    (("data", "inspect", "f", "--skip-invalid"), ["No such option: --skip-invalid",
                                                  "data inspect --help)"]),
    (("bundle",), ["Missing argument 'RUN...'"]),
    (("nosuch",), ["No such command 'nosuch'"]),
])
def test_usage_errors_are_one_line(args, needles):
    assert_one_line_error(run_cli_in_process(*args), *needles)


def test_help_still_shows_and_exits_zero():
    proc = run_cli_in_process("train", "--help")
    assert proc.returncode == 0 and "Usage:" in proc.stdout and "--data" in proc.stdout
    assert proc.stderr == ""


@pytest.mark.parametrize("record,needle", [
    ({"messages": [{"role": "assistant", "content": "I start."}]}, "messages[0]"),
    ({"conversations": [{"from": "gpt", "value": "I start."}]}, "conversations[0]"),
])
def test_record_that_starts_with_the_assistant(tmp_path, record, needle):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant",
                                                             "content": "b"}]}
    data = tmp_path / "chats.jsonl"
    if "conversations" in record:
        good = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt",
                                                                     "value": "b"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    proc = run_cli_in_process("data", "inspect", str(data))
    assert_one_line_error(proc, "chats.jsonl:2:", needle, "starts with an assistant turn",
                          "expected a user or system message")
