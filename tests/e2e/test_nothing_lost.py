"""Nothing lost: a full disk, SIGTERM and kill -9 leave a run that can be finished, in one line.

Real processes on the tiny random Llama (tests/helpers/tiny_models.py): ``edge-tune train`` stopped by
SIGTERM and resumed from another directory (its data moved, then pointed at); training onto a
small tmpfs that fills up mid-training, then once the adapter is saved, then finished by
``train --resume`` (mounted as root, else inside ``unshare -rm``); an
``export --merge`` stopped by SIGTERM that first finishes a run killed after training, and
sweeps the temp folder of a dead export. Every wait is on a file or an event, never a sleep
for a state to pass.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.cli import assert_one_line_error, run_cli
from edge_tune import api
from edge_tune import manifest as manifest_mod
from edge_tune.config import build
from edge_tune.errors import EdgeTuneError
from edge_tune.events import Log, Metric

pytestmark = pytest.mark.slow
TINY_ARGS = ("--batch-size", "2", "--seq-len", "64", "--rank", "4", "--no-verify",
             "--report-to", "none")


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.Popen([sys.executable, "-m", "edge_tune", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc: subprocess.Popen, what: str, bound: float = 600):
    """Poll ``condition()`` until it returns something true; fail if ``proc`` ends first.
    (The bound only stops a hang.)"""
    end = time.monotonic() + bound
    while time.monotonic() < end:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"process ended before {what}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def stopped_then_resumed(tiny, demo_jsonl, tmp_path_factory):
    """A run started in A with relative paths, stopped by SIGTERM, its data moved, then
    resumed from B: (run dir, the stop's stderr, the failed resume, the resume)."""
    root = tmp_path_factory.mktemp("elsewhere")
    a, b = root / "A", root / "B"
    a.mkdir()
    b.mkdir()
    shutil.copy(demo_jsonl, a / "data.jsonl")
    shutil.copy(tiny, a / "tiny.gguf")
    proc = _cli("train", "--data", "data.jsonl", "--model", "tiny.gguf", "--out", "runs/r",
                "--max-steps", "8", "--save-every", "2", *TINY_ARGS, cwd=a)
    run = a / "runs" / "r"
    _wait_for(lambda: (run / "checkpoint" / "state.json").is_file(), proc, "a checkpoint")
    proc.send_signal(signal.SIGTERM)  # as `timeout` and service managers stop a command
    _, stopped = proc.communicate(timeout=300)
    stopped_code = proc.returncode
    (a / "data.jsonl").rename(a / "moved.jsonl")
    missing = run_cli("train", "--resume", str(run), cwd=b)
    resumed = run_cli("train", "--resume", str(run), "--data", "../A/moved.jsonl", cwd=b)
    return run, (stopped_code, stopped), missing, resumed


def test_sigterm_stops_train_with_a_checkpoint_and_says_how_to_continue(stopped_then_resumed):
    run, (code, stderr), _, _ = stopped_then_resumed
    assert code == 130, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: training cancelled: stopped at step "), last
    assert "checkpoint kept in runs/r/checkpoint" in last
    assert "`edge-tune train --resume runs/r`" in last
    assert "Traceback" not in stderr


def test_resume_from_another_directory_names_moved_data_then_continues(stopped_then_resumed):
    run, _, missing, resumed = stopped_then_resumed
    # the data is not there: say which file and how to point at it; never "start a new run"
    assert_one_line_error(missing, "data.jsonl", "is not there", "--data PATH")
    assert "new run" not in missing.stderr
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from the checkpoint at step" in resumed.stderr  # not from step 0
    man = manifest_mod.read(run)
    assert man is not None and man.result.steps == 8 and (run / "adapter.gguf").is_file()
    assert not (run / "checkpoint").exists() and not _temps(run)


def test_export_finishes_a_run_killed_after_training_and_sigterm_leaves_no_temp(
        stopped_then_resumed, tmp_path):
    run, *_ = stopped_then_resumed
    # what a kill between the adapter's save and the manifest leaves, with what older
    # versions left when killed while deleting the checkpoint
    (run / "checkpoint").mkdir()
    (run / "manifest.json").unlink()
    (run / "adapter.gguf").unlink()
    assert api.resume_state(run)["finished"]
    out = tmp_path / "X"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = out / f".merged.gguf.{dead}.abcd1234.tmp"  # an export killed by kill -9
    stale.mkdir()
    (stale / "merged-f32.gguf").write_bytes(b"\0" * (1 << 20))
    live = out / f".merged.gguf.{os.getpid()}.live1234.tmp"  # this process still runs
    live.mkdir()

    proc = _cli("export", str(run), "--merge", "--output", str(out / "merged.gguf"), cwd=tmp_path)
    mine = f".merged.gguf.{proc.pid}."
    _wait_for(lambda: [p for p in out.iterdir() if p.name.startswith(mine)], proc,
              "the export's temp folder")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "removed 1 leftover(s) of killed edge-tune processes" in stderr
    assert not stale.exists() and live.is_dir()
    assert [p.name for p in out.iterdir()] == [live.name]  # no temp, no half-written model
    # the run itself was finished from what training saved, before the merge began
    assert (run / "manifest.json").is_file() and (run / "adapter.gguf").is_file()
    assert not (run / "checkpoint").exists()
    assert "training had finished" in stderr


# --- a small full filesystem ----------------------------------------------------------------


IN_NAMESPACE = "EDGE_TUNE_TEST_IN_USERNS"  # set when a test re-runs itself under unshare


def _rerun_in_user_namespace(request) -> None:
    """Not root: run this very test again inside a user + mount namespace (``unshare -rm``,
    where mounting a tmpfs is allowed) and report its outcome; skip where the kernel or
    policy allows no unprivileged namespaces."""
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare, "-rm", "true"], capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root or an unprivileged user namespace")
    proc = subprocess.run(
        [unshare, "-rm", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{request.node.path}::{request.node.name}"], capture_output=True, text=True,
        cwd=request.config.rootpath, env=dict(os.environ, **{IN_NAMESPACE: "1"}))
    assert proc.returncode == 0 and "1 passed" in proc.stdout, \
        proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.fixture
def small_fs(tmp_path, request):
    """A 32 MiB tmpfs the test mounts: as root here, else in a user namespace (the test then
    runs again in one, and this run gets None: nothing left to do). A loop device would need
    root too."""
    if not os.environ.get(IN_NAMESPACE) and (
            os.geteuid() != 0 or os.environ.get("EDGE_TUNE_TEST_FORCE_USERNS")):
        _rerun_in_user_namespace(request)
        yield None  # it ran, and passed, inside the namespace
        return
    mnt = tmp_path / "small"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder: Path, leave: int = 0) -> Path:
    """Write a filler file until the filesystem has ``leave`` bytes free (0: full)."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while shutil.disk_usage(folder).free - size >= leave:
                    f.write(b"\0" * size)
                    f.flush()
            except OSError:
                pass
    return filler


def _cfg(data, out, model, save_every=0):
    return build(None, data=str(data), out=str(out), model=str(model), max_steps=6,
                 batch_size=2, seq_len=64, rank=4, save_every=save_every, verify=False,
                 report_to="none")


def test_full_disk_keeps_what_was_trained_and_resume_finishes_the_run(small_fs, tiny,
                                                                      demo_jsonl):
    if small_fs is None:  # not root: it ran inside a user namespace, and passed there
        return
    # not enough room for what the plan says a run writes: one line before any work
    filler = _fill(small_fs, leave=4 << 20)
    with pytest.raises(EdgeTuneError) as info:
        api.train(_cfg(demo_jsonl, small_fs / "refused", tiny))
    assert info.value.exit_code == 2
    assert "not enough free disk space" in str(info.value) and str(small_fs) in str(info.value)
    assert not (small_fs / "refused").exists()
    filler.unlink()

    # the disk fills up during training: the worker's next save fails, the last checkpoint stays
    run = small_fs / "run"

    def mid_training(event):
        if isinstance(event, Metric) and event.split == "train" and event.step == 3:
            _fill(small_fs)

    with pytest.raises(EdgeTuneError) as info:
        api.train(_cfg(demo_jsonl, run, tiny, save_every=2), mid_training)
    message = str(info.value)
    assert info.value.exit_code == 2 and "\n" not in message, message
    assert "no space left on device" in message and str(run) in message
    assert "kept: the checkpoint of step " in message and "/6 in " in message
    assert f"`edge-tune train --resume {run}`" in message
    assert "internal error" not in message and "training failed" not in message
    step = api.resume_state(run)["step"]
    assert step in (2, 4) and not _temps(run)
    (small_fs / "filler").unlink()

    # resumed, the disk fills up the moment training has saved the adapter (the checkpoint's
    # files are held by hard links, so deleting it frees nothing)
    hold = small_fs / "hold"
    hold.mkdir()

    def after_training(event):
        if isinstance(event, Log) and event.message.startswith("training finished"):
            for f in (run / "checkpoint").iterdir():
                os.link(f, hold / f.name)
            _fill(small_fs)

    trained: list[int] = []
    with pytest.raises(EdgeTuneError) as info:
        api.train(None, lambda e: (isinstance(e, Metric) and e.split == "train" and
                                   trained.append(e.step)) or after_training(e), resume=run)
    assert trained == list(range(step + 1, 7))  # continued, not restarted
    message = str(info.value)
    assert info.value.exit_code == 2 and "\n" not in message
    assert "no space left on device" in message and str(run) in message
    assert f"kept: the trained adapter in {run / 'adapter'}" in message
    assert f"`edge-tune train --resume {run}`" in message
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / "manifest.json").exists() and not _temps(run)
    assert api.resume_state(run)["finished"]

    (small_fs / "filler").unlink()
    shutil.rmtree(hold)
    said: list = []
    finished = api.train(None, said.append, resume=run)  # no training: the adapter is there
    assert not [e for e in said if isinstance(e, Metric)]
    assert any("training had finished (6 steps)" in getattr(e, "message", "") for e in said)
    man = finished.manifest
    assert man.result.steps == 6 and man.data.records and (run / "adapter.gguf").is_file()
    assert not (run / "checkpoint").exists()

    # a merged export that cannot fit (the F32 merge, then F16) is refused before it writes
    with pytest.raises(EdgeTuneError) as info:
        api.export(run, merge=True, out=small_fs / "merged.gguf", verify=False)
    assert info.value.exit_code == 2 and "not enough free disk space" in str(info.value)
    assert "an F32 merge of" in str(info.value) and str(small_fs) in str(info.value)
    assert sorted(p.name for p in small_fs.iterdir()) == ["run"]
