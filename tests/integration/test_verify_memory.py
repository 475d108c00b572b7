"""``verify`` stays within the plan's memory: the peak resident memory of ``edge-tune verify
RUN`` (what ``train`` runs after training) is under the verify peak that ``plan`` gives for
the same model and settings; and the comparison,
now summed a few positions at a time, gives the numbers of the whole-array formulas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from tests.helpers.cli import REPO, run_cli_in_process

TRAIN = ("--backend", "cpu", "--max-steps", "2", "--batch-size", "4", "--seq-len", "64",
         "--lr", "1e-2")

# The child reports its own peak RSS as it exits (the worker's peak_rss_bytes: VmHWM,
# kernel-kept, no sampling, per address space; getrusage's ru_maxrss survives fork + exec, so
# inside a long suite it reported the pytest parent's 2.5 GiB instead of the child's size).
_PEAK = """
import atexit, os, sys
from edge_tune.training.worker import peak_rss_bytes
atexit.register(lambda: open(os.environ["PEAK_FILE"], "w").write(str(peak_rss_bytes())))
from edge_tune.cli import main
sys.argv = ["edge-tune", *sys.argv[1:]]
main()
"""


def test_train_verify_peak_is_under_the_plan(tiny, tiny_hf, demo_jsonl, tmp_path):
    # tiny_hf: the dequantized copy is made (and cached) before the measured process runs,
    # which then measures training's parent and verify, not a first-time dequantization.
    data = tmp_path / "d.jsonl"
    data.write_text("".join(demo_jsonl.read_text().splitlines(keepends=True)[:8]))
    planned = run_cli_in_process("plan", "--model", str(tiny), "--data", str(data), *TRAIN,
                                 "--json")
    assert planned.returncode == 0, planned.stderr
    estimate = json.loads(planned.stdout)["estimate"]
    verify_peak = estimate["verify_peak_gib"] * 2 ** 30
    assert estimate["peak_gib"] >= estimate["verify_peak_gib"] > 0

    run = tmp_path / "run"
    # A cache of its own: verify then reads only what this run made.
    own = dict(os.environ, EDGE_TUNE_CACHE=str(tmp_path / "cache"))
    trained = subprocess.run([sys.executable, "-m", "edge_tune", "train", "--model", str(tiny),
                              "--data", str(data), *TRAIN, "--report-to", "none", "--no-verify",
                              "--out", str(run)], capture_output=True, text=True, cwd=REPO,
                             timeout=600, env=own)
    assert trained.returncode == 0, trained.stderr[-2000:]
    peak_file = tmp_path / "peak"
    env = dict(own, PEAK_FILE=str(peak_file), COLUMNS="200", NO_COLOR="1")
    proc = subprocess.run([sys.executable, "-c", _PEAK, "verify", str(run)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0 and "within tolerance" in proc.stdout, proc.stderr[-2000:]
    measured = int(peak_file.read_text())
    print(f"verify's process: {measured / 2 ** 30:.3f} GiB; plan's verify peak "
          f"{verify_peak / 2 ** 30:.3f} GiB")
    # Memory, not time: a busy machine does not move it. Verify keeping every position's
    # logits of every sample in float64 peaked at ~1.06 GiB here.
    assert measured < verify_peak


def test_chunked_comparison_equals_the_whole_array_formulas(monkeypatch):
    from edge_tune import verify

    monkeypatch.setattr(verify, "CHUNK_ELEMENTS", 3 * 700)  # 3 rows a chunk: several chunks
    rng = np.random.default_rng(0)
    shapes = [(7, 700), (5, 700)]
    tb, tt, fb, ft, rt = ([rng.normal(0, 2, s).astype(np.float32) for s in shapes]
                          for _ in range(5))
    err, top1, kl, n = verify.compare(tb, tt, fb, ft, rt)

    want = np.concatenate([t.astype(np.float64) - b for t, b in zip(tt, tb)])
    got = np.concatenate([t.astype(np.float64) - b for t, b in zip(ft, fb)])
    assert np.isclose(err, np.linalg.norm(got - want) / np.linalg.norm(want), rtol=1e-12)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = np.concatenate(tt).astype(np.float64), np.concatenate(rt).astype(np.float64)
    lp, lq = log_softmax(p), log_softmax(q)
    picked = np.take_along_axis(lp, q.argmax(-1)[:, None], axis=-1)[:, 0]
    assert top1 == np.mean(picked >= lp.max(-1) - verify.TIE_NATS) and n == 12
    assert np.isclose(kl, np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)), rtol=1e-12)
    got_file = np.concatenate([t.astype(np.float64) - b for t, b in zip(rt, fb)])
    assert np.isclose(verify.file_effect(tb, tt, fb, rt),
                      np.sum(got_file * want) / np.sum(want * want), rtol=1e-12)
