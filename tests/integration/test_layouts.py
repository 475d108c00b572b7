"""Data layouts (issue 25, item 2): mlx-lm's train/valid/test folders, HF ``datasets``
save_to_disk folders and Arrow files, hub IDs with config/split read from a local hub cache,
``--columns``, ``--max-samples`` and weighted mixes. Real files throughout; one real ``train``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.helpers.cli import assert_one_line_error, run_cli

from edge_tune.config import build
from edge_tune.data.formats import read_records
from edge_tune.data.layouts import data_spec, parse_columns, parse_spec, role_of
from edge_tune.errors import EdgeTuneError


def _chat(tag: str, i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"{tag} question {i}"},
                         {"role": "assistant", "content": f"{tag} answer {i}"}]}


def _folder(root: Path, counts: dict, suffix: str = ".jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, n in counts.items():
        (root / f"{name}{suffix}").write_text(
            "".join(json.dumps(_chat(name.upper() + "MARK", i)) + "\n" for i in range(n)))
    return root


def _read_train(cfg_kw: dict):
    from edge_tune.data.training import read_train_data

    said: list = []
    data, val, extra = read_train_data(build(None, **cfg_kw), said.append)
    return data, val, extra, [e.message for e in said]


# --- naming, pure ---------------------------------------------------------------------------

def test_spec_grammar(tmp_path):
    s = parse_spec("HuggingFaceTB/smoltalk:everyday-conversations@train")
    assert (s.hub, s.target, s.config, s.split, s.weight) == (
        True, "HuggingFaceTB/smoltalk", "everyday-conversations", "train", 1.0)
    s = parse_spec("HuggingFaceH4/ultrachat_200k@train_sft*0.5")
    assert (s.target, s.config, s.split, s.weight) == ("HuggingFaceH4/ultrachat_200k", None,
                                                       "train_sft", 0.5)
    odd = tmp_path / "a*2.jsonl"  # a path that exists is a path, whatever its characters
    odd.write_text("")
    assert parse_spec(str(odd)).target == str(odd) and parse_spec(str(odd)).weight == 1.0
    assert parse_spec(f"{odd}*2").weight == 2.0
    with pytest.raises(EdgeTuneError, match=r"weight 0 must be > 0"):
        parse_spec("x.jsonl*0")
    assert parse_columns("question=prompt, answer=completion") == {
        "question": "prompt", "answer": "completion"}
    assert parse_columns({"q": "prompt"}) == {"q": "prompt"}
    with pytest.raises(EdgeTuneError, match=r"'question' is not SRC=DST"):
        parse_columns("question")
    assert [role_of(n) for n in ("train.jsonl", "valid.jsonl", "validation.parquet",
                                 "val.csv", "dev.json", "test.jsonl",
                                 "train-00000-of-00002.parquet", "notes.jsonl",
                                 "train_test.jsonl", "training.jsonl")] == [
        "train", "valid", "valid", "valid", "valid", "test", "train", None, None, None]


def test_config_file_takes_lists_and_tables(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('data = ["a.jsonl", "b.jsonl*0.5"]\ncolumns = {question = "prompt"}\n'
                    "max_samples = 100\n")
    cfg = build(toml)
    assert cfg.data == ["a.jsonl", "b.jsonl*0.5"] and cfg.columns == "question=prompt"
    assert cfg.max_samples == 100
    assert build(None, data=["one.jsonl"]).data == "one.jsonl"  # one source stays a string
    with pytest.raises(EdgeTuneError, match="is not SRC=DST"):
        build(None, data="a.jsonl", columns="nonsense")


# --- folders ------------------------------------------------------------------------------

def test_folder_roles_are_named_and_test_is_not_read(tmp_path):
    d = _folder(tmp_path / "d", {"train": 5, "validation": 2, "test": 3})
    (d / "notes.jsonl").write_text(json.dumps(_chat("NOTE", 0)) + "\n")
    data, val, extra, said = _read_train({"data": str(d)})
    assert len(data.records) == 5 and len(val.records) == 2
    assert all("TRAINMARK" in r.messages[0]["content"] for r in data.records)
    assert f"{d}/train.jsonl: training" in said and f"{d}/validation.jsonl: validation" in said
    assert f"{d}/test.jsonl: left for `edge-tune eval`" in said
    assert any(line.startswith(f"{d}/notes.jsonl: not used") for line in said)
    assert extra["files"] == {"train": [str(d / "train.jsonl")],
                              "valid": [str(d / "validation.jsonl")],
                              "test": [str(d / "test.jsonl")],
                              "unused": [str(d / "notes.jsonl")]}
    # --val-split: the folder's valid file is said to be unused
    data, val, _, said = _read_train({"data": str(d), "val_split": 0.2})
    assert val is None and f"{d}/validation.jsonl: not used (--val-split gives the validation " \
                           "set)" in said
    # any reader of the folder sees its train part only (data inspect, verify, eval)
    assert len(read_records(str(d)).records) == 5
    assert len(read_records(f"{d}@test").records) == 3


def test_folder_without_role_names_trains_every_file(tmp_path):
    d = _folder(tmp_path / "plain", {"part1": 2, "part2": 3}, ".json")
    for f in d.iterdir():  # .json arrays this time
        f.write_text(json.dumps([json.loads(line) for line in f.read_text().splitlines()]))
    data, val, extra, said = _read_train({"data": str(d)})
    assert len(data.records) == 5 and val is None
    assert f"{d}/part1.json: training (no train/valid/test names in this folder: every data " \
           "file trains)" in said


def test_folder_with_nothing_to_train_is_one_line(tmp_path):
    d = _folder(tmp_path / "only-test", {"test": 2, "valid": 1})
    proc = run_cli("plan", "--data", str(d), "--model", "default")
    assert_one_line_error(proc, f"{d}: nothing to train on", "test.jsonl (test)",
                          "valid.jsonl (valid)", "name the training file train.jsonl")


def test_real_train_on_a_folder_never_trains_its_test_file(tmp_path, tiny):
    """mlx-lm's layout through a real `edge-tune train`: the training records are the train
    file's, validation is the valid file's, the test file is named and left for eval."""
    from edge_tune.eval.held_out import held_out_records
    from edge_tune.manifest import Manifest

    d = _folder(tmp_path / "mlx", {"train": 12, "valid": 3, "test": 2})
    out = tmp_path / "run"
    proc = run_cli("train", "--data", str(d), "--model", str(tiny), "--out", str(out),
                   "--max-steps", "2", "--batch-size", "4", "--seq-len", "64", "--backend",
                   "cpu", "--no-verify", "--report-to", "none", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in (f"{d}/train.jsonl: training", f"{d}/valid.jsonl: validation",
                 f"{d}/test.jsonl: left for `edge-tune eval`",
                 "12 training examples, 3 validation examples"):
        assert line in proc.stderr, proc.stderr
    man = json.loads((out / "manifest.json").read_text())
    data = man["data"]
    assert (data["records"], data["examples"], data["val_records"]) == (12, 12, 3)
    assert data["files"] == {"train": [str(d / "train.jsonl")],
                             "valid": [str(d / "valid.jsonl")],
                             "test": [str(d / "test.jsonl")]}
    assert data["val"] == str(d / "valid.jsonl")
    # `edge-tune eval RUN` takes the folder's test file as its held-out data
    records, where = held_out_records(Manifest.load(out / "manifest.json"), None)
    assert where == f"test file {d / 'test.jsonl'}"
    assert [r.messages[0]["content"] for r in records] == ["TESTMARK question 0",
                                                           "TESTMARK question 1"]


# --- datasets: save_to_disk, Arrow --------------------------------------------------------

def _qa(n: int, tag: str = "") -> list[dict]:
    return [{"question": f"{tag}q{i}", "answer": f"a{i}", "id": i} for i in range(n)]


def test_save_to_disk_folders_and_arrow_files(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    qa = "question=prompt,answer=completion"
    ds = datasets.Dataset.from_list(_qa(4))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_list(_qa(2, "v")),
                          "test": datasets.Dataset.from_list(_qa(1, "t"))}).save_to_disk(
        str(tmp_path / "dict"))
    r = read_records(data_spec(str(tmp_path / "saved"), qa))
    assert [x.where for x in r.records][:2] == [f"{tmp_path}/saved:#1", f"{tmp_path}/saved:#2"]
    assert r.records[0].messages == [{"role": "user", "content": "q0"},
                                     {"role": "assistant", "content": "a0"}]
    data, val, extra, said = _read_train({"data": str(tmp_path / "dict"), "columns": qa})
    assert len(data.records) == 4 and [m.messages[0]["content"] for m in val.records] == [
        "vq0", "vq1"]
    assert f"{tmp_path}/dict/test: left for `edge-tune eval`" in said
    arrow = next((tmp_path / "saved").glob("data-*.arrow"))  # IPC stream format
    assert len(read_records(data_spec(str(arrow), qa)).records) == 4
    import pyarrow as pa

    table = pa.Table.from_pylist(_qa(3))
    with pa.OSFile(str(tmp_path / "file-format.arrow"), "wb") as sink:  # IPC file format
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    assert len(read_records(data_spec(str(tmp_path / "file-format.arrow"), qa)).records) == 3
    # without the datasets package, pyarrow reads the shards state.json lists
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    r2 = read_records(data_spec(str(tmp_path / "saved"), qa))
    assert [x.messages for x in r2.records] == [x.messages for x in r.records]


# --- columns, max-samples, mixing ---------------------------------------------------------

def test_columns_max_samples_and_weights(tmp_path):
    csv = tmp_path / "qa.csv"
    csv.write_text("question,answer\n" + "".join(f"q{i},a{i}\n" for i in range(10)))
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _qa(4, "j")))  # columns: every source
    data, _, extra, said = _read_train({"data": [f"{csv}*0.5", f"{jsonl}*2"],
                                        "columns": "question=prompt,answer=completion"})
    assert len(data.records) == 5 + 8
    assert extra["mix"] == [{"source": str(csv), "weight": 0.5, "read": 10, "used": 5},
                            {"source": str(jsonl), "weight": 2.0, "read": 4, "used": 8}]
    assert f"mix (seed 0): {csv} 10 x0.5 = 5, {jsonl} 4 x2 = 8; 13 training rows" in said
    again, _, _, _ = _read_train({"data": [f"{csv}*0.5", f"{jsonl}*2"],
                                  "columns": "question=prompt,answer=completion"})
    assert [r.where for r in again.records] == [r.where for r in data.records]  # seeded
    data, _, _, said = _read_train({"data": str(csv), "max_samples": 3,
                                    "columns": "question=prompt,answer=completion"})
    assert [r.where for r in data.records] == [f"{csv}:2", f"{csv}:3", f"{csv}:4"]
    assert f"--max-samples 3: read at most the first 3 records of each source ({csv} 3)" in said
    proc = run_cli("plan", "--data", str(csv), "--columns", "question=prompt,reply=completion",
                   "--model", "default")
    assert_one_line_error(proc, f"{csv}:2: missing column 'reply' (mapped by --columns "
                          "reply=completion; found keys: answer, question)")


def test_resume_fingerprint_covers_every_file_of_a_folder(tmp_path):
    from edge_tune.data.readers import data_fingerprint
    from edge_tune.fsutil import sha256_file

    d = _folder(tmp_path / "f", {"train": 2, "valid": 1})
    one = data_fingerprint(data_spec(str(d / "train.jsonl")))
    assert one == sha256_file(d / "train.jsonl")  # one file: as before
    before = data_fingerprint(data_spec(str(d)))
    (d / "valid.jsonl").write_text(json.dumps(_chat("X", 9)) + "\n")
    assert data_fingerprint(data_spec(str(d))) != before


# --- hub IDs, offline from the cache ------------------------------------------------------

def _hub_dataset(home: Path, repo_id: str) -> None:
    """A dataset in the hub cache as `hf download --repo-type dataset` leaves it: refs/main,
    snapshots/COMMIT with a README whose YAML names two configs and their splits."""
    repo = home / "hub" / ("datasets--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (snap / "everyday").mkdir(parents=True)
    (snap / "other").mkdir()
    (snap / "README.md").write_text(
        "---\nconfigs:\n- config_name: everyday\n  data_files:\n  - split: train_sft\n"
        "    path: everyday/train_sft-*\n  - split: test_sft\n    path: everyday/test_sft-*\n"
        "- config_name: other\n  data_files:\n  - split: train\n    path: other/train-*\n"
        "---\n")
    for rel, n in (("everyday/train_sft-00000.jsonl", 5), ("everyday/test_sft-00000.jsonl", 2),
                   ("other/train-00000.jsonl", 3)):
        (snap / rel).write_text("".join(json.dumps({"q": f"{rel.split('/')[0]} {i}",
                                                    "a": "ok"}) + "\n" for i in range(n)))


def test_hub_ids_with_config_split_and_columns_from_the_cache(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    home = tmp_path / "hf"
    _hub_dataset(home, "org/chats")
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    code = ("import json, sys; from edge_tune.data.formats import read_records; "
            "from edge_tune.data.layouts import data_spec; "
            "r = read_records(data_spec(sys.argv[1], 'q=prompt,a=completion', 4)); "
            "print(json.dumps([[x.where, x.messages[0]['content']] for x in r.records]))")
    import subprocess
    import sys

    def read(spec):
        proc = subprocess.run([sys.executable, "-c", code, spec], capture_output=True,
                              text=True, env={**__import__("os").environ, **env}, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    assert read("org/chats:everyday@train_sft") == [
        [f"org/chats:everyday@train_sft:#{i + 1}", f"everyday {i}"] for i in range(4)]
    assert read("org/chats:other") == [[f"org/chats:other:#{i + 1}", f"other {i}"]
                                       for i in range(3)]
    proc = run_cli("plan", "--data", "org/chats:everyday@nope", "--columns", "q=prompt,a=completion",
                   "--model", "default", env=env)
    assert_one_line_error(proc, "org/chats:everyday@nope: cannot load it from the Hugging Face "
                          "cache", "nope")


def test_hub_id_not_cached_offline_is_one_line(tmp_path):
    pytest.importorskip("datasets")
    env = {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    proc = run_cli("plan", "--data", "HuggingFaceH4/ultrachat_200k@train_sft", "--model",
                   "default", env=env)
    assert_one_line_error(proc, "HuggingFaceH4/ultrachat_200k: not in the Hugging Face cache",
                          "and offline; fetch it once with `hf download --repo-type dataset "
                          "HuggingFaceH4/ultrachat_200k`")
