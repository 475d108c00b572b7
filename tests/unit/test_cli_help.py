"""`--help` reads as prose: paragraphs reflowed, examples kept line by line, and bracketed
defaults shown (rich markup used to swallow "[default: ...]", leaving a stray " .")."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def help_text(*command: str) -> str:
    env = dict(os.environ, COLUMNS="80", NO_COLOR="1")
    proc = subprocess.run([sys.executable, "-m", "edge_tune", *command, "--help"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("command,shown", [
    ("bundle", ["[default: the runs' base]", "./OUT/install.sh"]),
    ("verify", ["(exact: catches wrong alpha"]),
    ("convert-base", ["[default: NAME-OUTTYPE.gguf here]"]),
    ("export", ["(llama.cpp's own quantizer)", "[default: F16]"]),
])
def test_help_has_no_swallowed_defaults_or_broken_lines(command, shown):
    text = help_text(command)
    flat = " ".join(line.strip(" │") for line in text.splitlines())
    for phrase in shown:
        assert phrase in " ".join(flat.split()), (phrase, text)
    assert not re.search(r" \.(\s|$)", text), text  # "Output .gguf ." was left
    prose = [line for line in text.splitlines() if line.startswith(" ") and line.strip()
             and "Usage:" not in line]
    # a docstring's hard line break used to end a prose line after a word or two
    assert all(len(line.rstrip()) > 20 for line in prose[:-1] if not line.rstrip()
               .endswith((".", ":", ")"))), text


def test_examples_stay_one_per_line():
    text = help_text("export")
    lines = [line.strip() for line in text.splitlines()]
    assert sum(line.startswith("edge-tune export runs/demo") for line in lines) == 6, text


def test_train_help_lists_every_method():
    """--method's value name (TrainConfig's metadata) names every method the config accepts;
    grpo was missing from it."""
    import dataclasses

    from edge_tune.config import _CHECKS, TrainConfig

    meta = next(f for f in dataclasses.fields(TrainConfig) if f.name == "method").metadata
    shown = meta["metavar"].split("|")
    valid, _ = _CHECKS["method"]
    assert all(valid(m) for m in shown) and shown[-1] == "grpo", shown
    assert not valid("nope")
    text = help_text("train")
    rows = text.splitlines()
    at = next(i for i, row in enumerate(rows) if "--method " in row)
    assert "grpo" in "".join(rows[at:at + 2]).replace(" ", ""), rows[at:at + 2]
