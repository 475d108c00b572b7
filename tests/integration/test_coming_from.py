"""Coming from another tool, on the command line: its config file, its flag names, its
defaults (--preset) and exact batch settings (--exact), through `plan` (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.cli import assert_one_line_error, run_cli_in_process

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "coming_from"


@pytest.fixture()
def plan(demo_jsonl):
    def run(*args: str):
        return run_cli_in_process("plan", "--data", str(demo_jsonl), "--model", "default",
                                  "--memory-gib", "64", *args)
    return run


def test_an_axolotl_config_is_planned_with_each_key_said(plan):
    # its datasets are hub sets of alpaca records: the demo's chats instead
    proc = plan("--config", str(CONFIGS / "axolotl_lora.yml"), "--format", "auto")
    assert proc.returncode == 0, proc.stderr
    assert "axolotl_lora.yml: lora_r: 16 -> rank 16" in proc.stderr
    assert "axolotl_lora.yml: learning_rate: 0.0002 -> lr 0.0002" in proc.stderr
    assert "axolotl_lora.yml: evals_per_epoch ignored: 4: use eval_every (steps)" in proc.stderr
    assert "settings: batch-size 2, grad-accum 2, seq-len 2048" in proc.stdout
    # the recipe's step size beside edge-tune's: lr 2e-4 x 32/16
    assert "step size: lr 0.0002 x alpha/r 32/16 = 0.0004; 1/5 of edge-tune's default (0.002)" \
        in proc.stdout


def test_strict_refuses_a_key_it_cannot_honour(plan):
    proc = plan("--config", str(CONFIGS / "unsloth_cli.yaml"), "--strict")
    assert_one_line_error(proc, "unsloth_cli.yaml: load_in_4bit: ignored", "--strict")
    assert plan("--config", str(CONFIGS / "trl_sft.yaml"), "--strict", "--json").returncode == 0


def test_other_tools_flag_names_are_aliases_of_the_options(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # each option's names on one line
    help_text = run_cli_in_process("train", "--help").stdout
    for names in ("--lr,--learning-rate", "--rank,--lora-r", "--alpha,--lora-alpha",
                  "--epochs,--num-epochs,--num-train-epochs", "--max-steps,--iters",
                  "--grad-accum,--gradient-accumulation-steps",
                  "--seq-len,--cutoff-len,--max-seq-length", "--out,--output-dir",
                  "--batch-size,--per-device-train-batch-size"):
        assert names in help_text.replace(" ", ""), names
    assert "--preset" in help_text and "--exact" in help_text and "--strict" in help_text


def test_aliases_presets_and_their_order(plan):
    proc = plan("--learning-rate", "2e-4", "--lora-r", "8", "--lora-alpha", "16",
                "--num-train-epochs", "1", "--max-seq-length", "256",
                "--gradient-accumulation-steps", "2", "--per-device-train-batch-size", "4",
                "--json")
    report = json.loads(proc.stdout)
    assert report["settings"]["batch_size"] == 4 and report["settings"]["grad_accum"] == 2
    assert report["settings"]["seq_len"] == 256
    assert report["step"]["lr"] == 2e-4 and report["step"]["step_size"] == pytest.approx(4e-4)
    mlx = json.loads(plan("--preset", "mlx-lm", "--json").stdout)
    assert (mlx["preset"], mlx["step"]["rank"], mlx["step"]["alpha"], mlx["step"]["lr"]) == (
        "mlx-lm", 8, 160.0, 1e-5)
    assert mlx["estimate"]["total_steps"] == 1000  # mlx-lm's iters
    mine = json.loads(plan("--preset", "unsloth", "--lr", "1e-4", "--json").stdout)
    assert (mine["step"]["lr"], mine["step"]["alpha"]) == (1e-4, 16.0)  # the flag wins


def test_exact_refuses_where_the_planner_would_change_the_batch(demo_jsonl):
    args = ("plan", "--data", str(demo_jsonl), "--batch-size", "64", "--seq-len", "2048",
            "--memory-gib", "2")
    changed = json.loads(run_cli_in_process(*args, "--json").stdout)
    assert changed["fits"] and changed["settings"]["batch_size"] < 64
    proc = run_cli_in_process(*args, "--exact")  # after what reading the data said: one line
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(
        "error: --exact: batch size 64, grad-accum 1 and seq-len 2048 need ~")
