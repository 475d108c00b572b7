"""`edge-tune train --nproc N`: torchrun, torch.distributed with gloo, on a tiny local Llama.

Two CPU processes with batch 2 and no accumulation take the same global batch (4 examples per
optimizer step) as one process with batch 2 and two micro-batches: same seed, same data order,
so the adapters and the loss curves must agree up to float summation order.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.cli import REPO, run_cli

COMMON = ("--max-steps", "4", "--batch-size", "2", "--seq-len", "128", "--seed", "3",
          "--precision", "fp32", "--no-verify")


def _train(tiny: Path, data: Path, out: Path, *extra: str) -> dict:
    proc = run_cli("train", "--data", str(data), "--model", str(tiny), *COMMON, "--out",
                   str(out), *extra, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads((out / "manifest.json").read_text()), "stderr": proc.stderr}


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tiny, demo_jsonl,
                                                                      tmp_path):
    import torch
    from safetensors.torch import load_file

    one = _train(tiny, demo_jsonl, tmp_path / "one", "--grad-accum", "2")
    two = _train(tiny, demo_jsonl, tmp_path / "two", "--nproc", "2", "--grad-accum", "1")
    assert (one["result"]["world_size"], two["result"]["world_size"]) == (1, 2)
    assert two["hyperparameters"]["nproc"] == 2

    # Loss curves: per optimizer step, the mean over the same 4 examples.
    assert len(one["result"]["losses"]) == len(two["result"]["losses"]) == 4
    assert two["result"]["losses"] == pytest.approx(one["result"]["losses"], rel=1e-5)
    assert two["result"]["tokens"] == one["result"]["tokens"]  # aggregated over both ranks
    assert one["result"]["losses"][0] != one["result"]["losses"][-1]  # it did train

    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)
    # B starts at zero in LoRA: the B matrices moved, so the comparison is not trivial.
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3
    # Only rank 0 wrote the run directory: no stray adapters or temporary folders.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir())
    # Each rank read and tokenized its shard only; the shards make up the whole data.
    # (Rank 0 reports to the user, rank 1 into train.log.)
    log = two["stderr"] + (tmp_path / "two" / "train.log").read_text()
    shards = [int(m) for m in re.findall(r"(\d+) training examples in rank \d's shard", log)]
    assert len(shards) == 2 and sum(shards) == one["result"]["examples"] == \
        two["result"]["examples"]
    assert max(shards) < one["result"]["examples"]


def _rank_process(parent_pid: int, rank: str):
    import psutil

    for child in psutil.Process(parent_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == rank and "edge_tune.training.worker" in \
                    " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def test_a_killed_rank_stops_the_job_with_one_line_and_a_resumable_checkpoint(
        tiny, demo_jsonl, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_tune", "train", "--data", str(demo_jsonl), "--model",
         str(tiny), "--max-steps", "100000", "--batch-size", "2", "--seq-len", "64",
         "--save-every", "2", "--no-verify", "--nproc", "2", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 600
        while not (out / "checkpoint" / "state.json").is_file():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
            time.sleep(0.5)
        victim = _rank_process(proc.pid, "1")
        assert victim is not None
        victim.send_signal(signal.SIGKILL)  # dies without a word, like the OOM killer does
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr
    assert lines[-1].startswith("error: distributed training stopped: rank 1 exited with code "
                                "-9"), lines[-1]
    assert f"--resume {out}" in lines[-1]
    assert (out / "checkpoint" / "state.json").is_file()
    assert not (out / "manifest.json").exists()


def test_worker_command_and_torchrun_summary_are_read_right():
    from edge_tune.training.runner import failed_rank, worker_command

    job = Path("/r/.job.json")
    assert worker_command(job, {"nproc": 1})[1:] == ["-m", "edge_tune.training.worker",
                                                     str(job)]
    two = worker_command(job, {"nproc": 2, "nnodes": 1})
    assert two[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node", "2"]
    assert "--standalone" in two and two[-3:] == ["-m", "edge_tune.training.worker", str(job)]
    many = worker_command(job, {"nproc": 4, "nnodes": 2, "rdzv": "10.0.0.1:29400"})
    assert many[many.index("--rdzv-endpoint") + 1] == "10.0.0.1:29400"
    assert many[many.index("--nnodes") + 1] == "2" and "--standalone" not in many
    summary = ("Failures:\n  <NO_OTHER_FAILURES>\n----\nRoot Cause (first observed failure):\n"
               "[0]:\n  time      : 2026-11-22_11:00:00\n  host      : box\n"
               "  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 4242)\n")
    assert failed_rank(summary) == (1, -9)
    assert failed_rank("nothing here") is None


@pytest.mark.parametrize("flags, needle", [
    (("--nproc", "0"), "nproc"),
    (("--nnodes", "2"), "--rdzv"),
    (("--nproc", "2", "--rdzv", "nohost"), "HOST:PORT"),
])
def test_bad_distributed_flags_are_one_line_errors(flags, needle, demo_jsonl):
    from tests.helpers.cli import assert_one_line_error

    proc = run_cli("train", "--data", str(demo_jsonl), *flags)
    assert_one_line_error(proc, needle)


def test_a_resumed_two_rank_run_matches_an_uninterrupted_run(tiny, demo_jsonl, tmp_path):
    """Rank 1 dies after a checkpoint; `train --resume` relaunches both ranks from it. The data
    order is a pure function of the step, so the finished adapter and loss curve equal an
    uninterrupted run with the same global batch (here: one process, two micro-batches)."""
    import torch
    from safetensors.torch import load_file

    # Enough steps that the kill (a 50 ms poll and a process scan after the first checkpoint,
    # at step 2) lands well before the run ends, also beside two busy loops.
    total = 30
    steps = ("--max-steps", str(total), "--batch-size", "2", "--seq-len", "128", "--seed", "5",
             "--precision", "fp32", "--no-verify", "--lr", "1e-3")
    ref = tmp_path / "ref"
    proc = run_cli("train", "--data", str(demo_jsonl), "--model", str(tiny), *steps, "--out",
                   str(ref), "--grad-accum", "2", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "run"
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_tune", "train", "--data", str(demo_jsonl), "--model",
         str(tiny), *steps, "--save-every", "2", "--nproc", "2", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 600
        while not (out / "checkpoint" / "state.json").is_file():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
            time.sleep(0.05)
        victim = _rank_process(proc.pid, "1")
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, proc.returncode
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert 2 <= state["step"] < total, state["step"]

    resumed = run_cli("train", "--resume", str(out), timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from the checkpoint at step {state['step']}/{total}" in \
        (out / "train.log").read_text()
    a = json.loads((ref / "manifest.json").read_text())["result"]
    b = json.loads((out / "manifest.json").read_text())["result"]
    assert b["world_size"] == 2 and len(b["losses"]) == total
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-4)
    assert b["tokens"] == a["tokens"]
    wa = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-3, atol=1e-5)
    assert not (out / "checkpoint").exists()
