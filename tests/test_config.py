"""Run configuration: defaults < run.toml < flags, with one-line errors."""

from __future__ import annotations

import pytest

from edge_tune.config import build
from edge_tune.errors import EdgeTuneError


def test_defaults_toml_and_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\ndata = "d.jsonl"\nrank = 8\nlr = 2e-4\nmax-steps = 40\n')
    cfg = build(toml, rank=4)
    assert (cfg.data, cfg.rank, cfg.lr, cfg.max_steps) == ("d.jsonl", 4, 2e-4, 40)
    assert cfg.alpha == 32.0 and cfg.batch_size == 8  # untouched defaults


@pytest.mark.parametrize("text,message", [
    ("data = 'x'\nrank = 'big'\n", "rank: 'big' is not a valid int"),
    ("data = 'x'\nrank = 0\n", "rank: 0 is not valid"),
    ("data = 'x'\nprecision = 'fp8'\n", "expected auto, bf16 or fp32"),
    ("data = 'x\n", "invalid TOML"),
    ("rank = 4\n", "no training data"),
])
def test_bad_configs(tmp_path, text, message):
    toml = tmp_path / "run.toml"
    toml.write_text(text)
    with pytest.raises(EdgeTuneError, match=message):
        build(toml)


def test_missing_config_file(tmp_path):
    with pytest.raises(EdgeTuneError, match="no such config file"):
        build(tmp_path / "nope.toml", data="d.jsonl")
