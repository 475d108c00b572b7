"""manifest.json as a typed Manifest: the file keeps its format (every key, its order), a bad
field is one line naming the file and the field, and older runs (fewer keys) still load."""

from __future__ import annotations

import json

import pytest
from tests.helpers.cli import assert_one_line_error, run_cli

from edge_tune import manifest as manifest_mod
from edge_tune.errors import DataError, ExitCode
from edge_tune.manifest import Manifest

# A manifest as `train` writes it (keys and order of commands/train.py and manifest.build),
# with a base converted from HF weights and keys this version does not type (kept as they are).
WRITTEN = {
    "format": "edge-tune-run/1",
    "created": "2026-11-30T09:12:01+00:00",
    "backend": "cpu",
    "backend_reason": "the only backend available on this machine",
    "kind": "lora",
    "base": {"spec": "tiny-hf", "hf_dir": "/m/tiny", "gguf": "/c/gguf/0a1b-f16.gguf",
             "sha256": None, "arch": "llama", "hub_id": None, "gguf_source": "converted",
             "gguf_from": "/m/tiny"},
    "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
    "chat_template_name": None,
    "chat_template_source": "model",
    "stop_tokens": ["<|im_end|>"],
    "hyperparameters": {"data": "d.jsonl", "rank": 8, "alpha": 16.0, "lr": 0.001, "seed": 0,
                        "val_split": 0.1, "system_mode": "keep", "target_modules": ["q_proj"],
                        "skip_invalid": False, "format": "auto"},
    "data": {"path": "/d/d.jsonl", "format": "openai", "sha256": "ab" * 32, "skipped": 0,
             "records": 16, "examples": 14, "val": None, "val_records": 2},
    "result": {"examples": 14, "steps": 6, "final_loss": 1.25, "val_loss": None, "tokens": 900,
               "tokens_per_second": 150.5, "train_seconds": 6.0, "precision": "fp32",
               "trainable_parameters": 4096, "losses": [2.0, 1.25], "world_size": 1,
               "peak_rss_bytes": 123456789},
    "adapter": {"peft": "adapter", "mlx": "mlx_adapter", "gguf": "adapter.gguf", "alpha": 16,
                "rank": 8},
    "plan": {"fits": True, "peak_bytes": 1000},
    "versions": {"edge-tune": "0.9.0", "torch": "2.9.0"},
}


def test_round_trip_is_the_file_as_written(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(WRITTEN, indent=2) + "\n")
    man = Manifest.load(path)
    assert man.base.gguf == "/c/gguf/0a1b-f16.gguf" and man.base.gguf_source == "converted"
    assert man.result.steps == 6 and man.result.extra["precision"] == "fp32"
    assert man.hyperparameters.rank == 8 and man.hyperparameters.extra["target_modules"] == [
        "q_proj"]
    assert man.adapter.alpha == 16 and man.adapter.mlx == "mlx_adapter"
    assert man.data.val is None and man.stop_tokens == ["<|im_end|>"]
    assert man.to_dict() == WRITTEN
    out = man.save(tmp_path / "again.json")  # byte for byte, key order included
    assert out.read_text() == path.read_text()
    assert not list(tmp_path.glob("*.tmp*"))


def test_build_writes_what_train_always_wrote(tmp_path):
    man = manifest_mod.build(config=WRITTEN["hyperparameters"], backend="cpu", backend_reason="x",
                             base=WRITTEN["base"], data=WRITTEN["data"], result=WRITTEN["result"],
                             tokenizer={"chat_template": "T", "chat_template_name": None,
                                        "chat_template_source": "model", "stop_tokens": []},
                             adapter=WRITTEN["adapter"], plan=None)
    manifest_mod.write(tmp_path, man)
    doc = json.loads((tmp_path / manifest_mod.MANIFEST).read_text())
    assert list(doc) == list(WRITTEN)  # every top-level key, in the order of old files
    assert doc["plan"] is None and doc["chat_template"] == "T" and doc["result"] == WRITTEN[
        "result"]
    assert doc["versions"]["edge-tune"] and manifest_mod.read(tmp_path) == man


def test_an_old_manifest_without_newer_keys_loads(tmp_path):
    old = {k: v for k, v in WRITTEN.items()
           if k not in ("chat_template_name", "chat_template_source", "plan", "stop_tokens")}
    old["base"] = {"spec": "default", "gguf": "/m/smol.gguf", "sha256": "cd" * 32}
    old["adapter"] = {"gguf": "adapter.gguf"}  # before `peft` was recorded
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    man = manifest_mod.read(tmp_path)
    assert man.plan is None and man.stop_tokens == [] and man.chat_template_name is None
    assert man.adapter.peft == "adapter" and man.base.hf_dir is None
    assert man.to_dict() == old  # nothing added to an old run's file


@pytest.mark.parametrize("path, value, said", [
    (("result", "steps"), "6", "result.steps: expected an integer, got a string"),
    (("adapter", "alpha"), True, "adapter.alpha: expected a number, got true/false"),
    (("stop_tokens",), ["<e>", 2], "stop_tokens[1]: expected a string, got an integer"),
    (("base",), "llama", "base: expected an object, got a string"),
    (("format",), None, "format: None (expected 'edge-tune-run/1')"),
])
def test_a_field_of_the_wrong_type_is_one_line_naming_it(tmp_path, path, value, said):
    doc = json.loads(json.dumps(WRITTEN))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    file = tmp_path / "manifest.json"
    file.write_text(json.dumps(doc))
    with pytest.raises(DataError) as info:
        manifest_mod.read(tmp_path)
    assert str(info.value) == f"{file}: {said}"
    assert info.value.exit_code == ExitCode.BAD_INPUT and "\n" not in str(info.value)


def test_a_broken_file_is_one_line_with_its_line(tmp_path):
    file = tmp_path / "manifest.json"
    file.write_text('{\n  "format": "edge-tune-run/1",\n  "base": }\n')
    with pytest.raises(DataError, match=rf"^{file}:3: invalid JSON"):
        manifest_mod.read(tmp_path)
    assert manifest_mod.read(tmp_path / "nothing-here") is None


def test_the_cli_names_the_bad_field(tmp_path):
    """A user-facing command that reads the run: one line, exit 2, no traceback."""
    run = tmp_path / "run"
    run.mkdir()
    bad = json.loads(json.dumps(WRITTEN))
    bad["adapter"]["gguf"] = 3
    (run / "manifest.json").write_text(json.dumps(bad))
    assert_one_line_error(run_cli("chat", "--adapter", str(run), "--prompt", "hi"),
                          f"{run / 'manifest.json'}: adapter.gguf: expected a string")
