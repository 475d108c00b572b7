"""Temp names that say whose they are, leftovers of dead processes swept, disk-full words
recognised, and the disk a run needs: the pure parts of "nothing lost" (no training)."""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys

import pytest

from edge_tune import fsutil
from edge_tune.errors import DiskFull
from edge_tune.planner import disk_bytes
from edge_tune.training.runner import last_line


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)


def test_atomic_temps_carry_the_pid_and_a_killed_writers_are_swept(tmp_path):
    seen = []
    with fsutil.atomic_path(tmp_path / "adapter") as tmp:
        seen.append(tmp.parent.name)
        tmp.mkdir()
        (tmp / "w").write_text("new")
    assert seen[0].startswith(f".adapter.{os.getpid()}.") and seen[0].endswith(".tmp")
    assert (tmp_path / "adapter" / "w").read_text() == "new"
    with fsutil.atomic_path(tmp_path / "adapter") as tmp:  # a folder replaces a folder
        tmp.mkdir()
        (tmp / "v").write_text("newer")
    assert [p.name for p in (tmp_path / "adapter").iterdir()] == ["v"]

    dead = tmp_path / f".merged.gguf.{_dead_pid()}.ab_12xyz.tmp"
    dead.mkdir()
    (dead / "merged-f32.gguf").write_bytes(b"\0" * 4096)
    old_file = tmp_path / f".manifest.json.{_dead_pid()}.q1w2e3r4.tmp"
    old_file.write_text("{}")
    alive = tmp_path / f".merged.gguf.{os.getpid()}.zz99zz99.tmp"
    alive.mkdir()
    user = tmp_path / ".notes.tmp"  # not ours: no pid in the name
    user.write_text("keep")
    removed = fsutil.sweep_leftovers(tmp_path)
    assert sorted(p.name for p, _ in removed) == sorted([dead.name, old_file.name])
    assert sum(size for _, size in removed) == 4096 + 2
    assert alive.is_dir() and user.is_file() and not dead.exists()
    line = fsutil.leftovers_line(removed)
    assert line.startswith("removed 2 leftover(s) of killed edge-tune processes in ")

    # temps of versions that did not name the pid: removed once untouched for a while
    legacy = tmp_path / ".merged-f16.gguf.k3j_9a0z"
    legacy.mkdir()
    fresh = tmp_path / ".adapter.q0w9e8r7.tmp"
    fresh.mkdir()
    assert fsutil.sweep_leftovers(tmp_path, legacy=("merged-f16.gguf", "adapter")) == []
    past = legacy.stat().st_mtime - 2 * fsutil.LEGACY_AGE
    os.utime(legacy, (past, past))
    assert [p for p, _ in fsutil.sweep_leftovers(tmp_path, legacy=("merged-f16.gguf",
                                                                   "adapter"))] == [legacy]
    assert fresh.is_dir() and alive.is_dir() and user.is_file()


def test_remove_tree_leaves_no_half_empty_folder(tmp_path):
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    (ckpt / "state.json").write_text("{}")
    fsutil.remove_tree(ckpt)
    assert list(tmp_path.iterdir()) == []
    fsutil.remove_tree(ckpt)  # gone already: nothing to do


def test_disk_full_is_recognised_however_it_is_wrapped(tmp_path):
    import errno

    assert fsutil.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    # safetensors (Rust) and torch say it only in words
    assert fsutil.is_disk_full(RuntimeError("Error while serializing: IoError(Os { code: 28, "
                                            "kind: StorageFull, message: \"No space left on "
                                            "device\" })"))
    try:
        try:
            raise OSError(errno.EDQUOT, "quota")
        except OSError as inner:
            raise ValueError("wrapped") from inner
    except ValueError as outer:
        assert fsutil.is_disk_full(outer)
    assert not fsutil.is_disk_full(OSError(errno.EACCES, "denied"))
    if Path("/dev/full").exists():  # writes there fail as on a full disk
        import numpy as np

        with open("/dev/full", "wb") as f, pytest.raises(OSError) as short:
            np.zeros(100_000).tofile(f)  # gguf-py writes tensors this way: no errno
        assert short.value.errno is None and fsutil.is_disk_full(short.value)

    with pytest.raises(DiskFull) as info:
        with fsutil.disk_full_says(tmp_path / "run", lambda: "kept: the adapter"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.exit_code == 2
    assert str(info.value).startswith(f"{tmp_path / 'run'}: no space left on device (")
    assert str(info.value).endswith("free); kept: the adapter")
    with pytest.raises(DiskFull, match="needs about .* free"):
        fsutil.require_free(tmp_path, 1 << 60, "a model")


def test_disk_a_run_needs_is_its_fullest_moment():
    lora = disk_bytes({"training format": 100.0, "gguf": 100.0}, full=False)
    assert lora == {"weights": 100.0, "checkpoint": 300.0, "gguf": 100.0, "total": 600.0}
    assert disk_bytes({"training format": 100.0, "gguf": 100.0}, False, periodic=False)[
        "total"] == 400.0  # the checkpoint beside the saved adapter at the end
    full = disk_bytes({"training format": 400.0, "gguf": 200.0}, full=True, periodic=False)
    assert full["total"] == 1600.0  # 3x + 1x (checkpoint and weights) > 1 + F32 + F16


def test_a_killed_workers_last_line_is_not_a_progress_bar(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("loading\nreal reason here\n  5%|#      | 1/20 [00:01<00:19,  1.00it/s]\r"
                   " 10%|##     | 2/20 [00:02<00:18,  1.00it/s]\n")
    assert last_line(log) == "real reason here"


def test_a_run_stored_with_relative_paths_resumes_from_anywhere(tmp_path, monkeypatch):
    """Runs started before paths were stored absolute: the data is found from where the run
    was started (``runs/`` sits in it), and data that is gone is named with how to point at
    it, never "start a new run"."""
    import json

    from edge_tune.errors import DataError
    from edge_tune.runs import RUN_CONFIG, load_run_config

    project = tmp_path / "project"
    run = project / "runs" / "old"
    run.mkdir(parents=True)
    (project / "data.jsonl").write_text('{"text": "hi"}\n')
    (run / RUN_CONFIG).write_text(json.dumps(
        {"config": {"data": "data.jsonl", "out": "runs/old", "max_steps": 4},
         "data_sha256": "x"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg, _ = load_run_config(run)
    assert cfg.data == str(project / "data.jsonl") and cfg.out == str(run)

    (project / "data.jsonl").unlink()
    with pytest.raises(DataError) as info:
        load_run_config(run)
    message = str(info.value)
    assert "data.jsonl is not there" in message and f"--resume {run} --data PATH" in message
    assert "new run" not in message
    cfg, _ = load_run_config(run, data=["/somewhere/else.jsonl"])  # --data: pointed at
    assert cfg.data == "/somewhere/else.jsonl"


def test_a_killed_bundles_copy_is_swept_by_the_next_bundle(tmp_path):
    """A bundle copies the base into a pid-named temp beside its output; the next bundle
    there removes a dead process's copy and keeps a live one's."""
    from edge_tune.bundle import plan_bundle, write_bundle

    base, adapter = tmp_path / "base.gguf", tmp_path / "a.gguf"
    base.write_bytes(b"GGUF" + bytes(60))
    adapter.write_bytes(b"GGUF" + bytes(28))
    dead = tmp_path / ".box.999999.abcd1234.tmp"  # no such pid
    live = tmp_path / f".box.{os.getpid()}.efgh5678.tmp"
    for temp in (dead, live):
        (temp / "base").mkdir(parents=True)
    said = []
    write_bundle(plan_bundle(base, [("a", adapter, None)]), tmp_path / "box", said.append,
                 wheels=False)
    assert not dead.exists() and live.exists()
    assert any("removed 1 leftover" in getattr(e, "message", "") for e in said)
    assert (tmp_path / "box" / "base" / "base.gguf").is_file()
