"""``verify RUN --merged FILE`` passes only a merge of that run: a file of another model is
refused up front in one line (architecture, vocabulary, tensor shapes), and one of the same
model without the run's adapter, or with another run's, fails (exit 1). Top-1 agreement's tie
rule is relative to the distribution, so a flat one does not make every position agree.

Runs: a tiny random Llama (hidden 64, 2 blocks, the default model's tokenizer), 2 steps each,
trained in this process; ``train`` verifies each on its own adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.helpers.cli import assert_one_line_error
from tests.helpers.cli import run_cli_in_process as cli
from tests.helpers.tiny_models import tiny_llama_gguf

TRAIN = ("--backend", "cpu", "--max-steps", "2", "--batch-size", "4", "--seq-len", "64",
         "--lr", "1e-2", "--report-to", "none")


@pytest.fixture(scope="module")
def tiny(default_gguf, tmp_path_factory) -> Path:
    return tiny_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf", default_gguf)


def _train(tiny: Path, demo_jsonl: Path, out: Path, seed: int, first: int) -> Path:
    data = out.parent / f"{out.name}.jsonl"
    data.write_text("".join(demo_jsonl.read_text().splitlines(keepends=True)[first:first + 8]))
    proc = cli("train", "--model", str(tiny), "--data", str(data), *TRAIN, "--seed", str(seed),
               "--out", str(out))
    assert proc.returncode == 0 and "(ok)" in proc.stderr, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def runs(tiny, demo_jsonl, tmp_path_factory) -> tuple[Path, Path]:
    """(this run, another run on the same base: other data and seed)."""
    where = tmp_path_factory.mktemp("runs")
    return (_train(tiny, demo_jsonl, where / "a", 0, 0),
            _train(tiny, demo_jsonl, where / "b", 1, 8))


def _merge(run: Path, quant: str) -> Path:
    out = run.parent / f"{run.name}-{quant}.gguf"
    if not out.is_file():
        proc = cli("export", str(run), "--merge", "-q", quant, "-o", str(out), "--no-verify")
        assert proc.returncode == 0, proc.stderr
    return out


def _verify(run: Path, merged: Path):
    proc = cli("verify", str(run), "--merged", str(merged), "--json", "--prompts", "2")
    return proc, (json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else None)


def test_top1_tie_is_relative_to_the_distribution():
    """A flat distribution: llama.cpp picks another token at every position. The absolute
    0.01-probability tie called that full agreement; the relative one calls it none."""
    from edge_tune.verify import TIE_NATS, compare

    rng = np.random.default_rng(0)
    torch_logits = rng.normal(0, 1.0, (20, 5000))  # max probability ~0.001
    llama_logits = torch_logits.copy()
    rows = np.arange(20)
    top = torch_logits.argmax(-1)
    llama_logits[rows, (top + 1) % 5000] = torch_logits[rows, top] + 1.0  # a different pick
    _, top1, _, _ = compare([torch_logits], [torch_logits], [torch_logits], [torch_logits],
                            [llama_logits])
    assert top1 == 0.0
    near = torch_logits.copy()  # a near-tie (TIE_NATS / 2 below the top) flipped: agreement
    near[rows, (top + 1) % 5000] = torch_logits[rows, top] - TIE_NATS / 2
    flipped = near.copy()
    flipped[rows, (top + 1) % 5000] += TIE_NATS
    _, top1, _, _ = compare([near], [near], [near], [near], [flipped])
    assert top1 == 1.0


def test_merged_file_of_another_model_is_refused_up_front(runs, default_gguf, tmp_path):
    import gguf

    run = runs[0]
    other_arch = tmp_path / "stablelm.gguf"
    w = gguf.GGUFWriter(str(other_arch), "stablelm")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(cli("verify", str(run), "--merged", str(other_arch)),
                          f"--merged {other_arch}: architecture stablelm", "is llama")
    narrower = tiny_llama_gguf(tmp_path / "hidden32.gguf", default_gguf, hidden=32)
    assert_one_line_error(cli("verify", str(run), "--merged", str(narrower)),
                          "tensor 'token_embd.weight' is [32, 49152]", "[64, 49152]")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 5)
    assert_one_line_error(cli("verify", str(run), "--merged", str(junk)), str(junk))


def test_merged_f32_file_is_what_the_exact_check_reads(runs, tiny):
    """The run's F32 merge passes with float-rounding error; the base itself (an F32 file
    without the adapter) fails the exact check: the given file is what is compared."""
    run = runs[0]
    proc, report = _verify(run, _merge(run, "F32"))
    assert proc.returncode == 0 and report["ok"], proc.stdout + proc.stderr
    assert report["effect_rel_err"] < 1e-3 and report["file_effect"] == pytest.approx(1, abs=1e-3)
    proc, report = _verify(run, tiny)
    assert proc.returncode == 1 and not report["ok"], proc.stdout + proc.stderr
    assert report["effect_rel_err"] > 0.9 and abs(report["file_effect"]) < 0.1
    assert any("not a merge of this run" in f for f in report["failures"])


def test_q8_merge_of_this_run_passes_and_of_another_run_fails(runs):
    this, other = runs
    proc, report = _verify(this, _merge(this, "Q8_0"))
    assert proc.returncode == 0 and report["ok"], proc.stdout + proc.stderr
    print("own Q8_0:", {k: v for k, v in report.items() if k != "greedy"})
    assert 0.8 < report["file_effect"] < 1.2
    proc, report = _verify(this, _merge(other, "Q8_0"))
    print("other run's Q8_0:", {k: v for k, v in report.items() if k != "greedy"})
    assert proc.returncode == 1 and not report["ok"], proc.stdout + proc.stderr
    # Two runs on the same kind of data move the logits alike (file effect ~0.5 here), but
    # their top tokens part: the relative tie no longer calls a flat distribution agreement.
    assert report["top1_agreement"] < 0.85 and report["file_effect"] < 0.8
