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


def test_val_and_val_split_are_exclusive():
    with pytest.raises(EdgeTuneError, match="either --val FILE or --val-split"):
        build(None, data="d.jsonl", val="v.jsonl", val_split=0.1)


def test_split_validation_is_seeded_and_disjoint():
    from edge_tune.data.split import split_validation

    records = list(range(50))
    train, val = split_validation(records, 0.1, seed=3)
    assert len(val) == 5 and sorted(train + val) == records
    assert split_validation(records, 0.1, seed=3) == (train, val)
    assert split_validation(records, 0.0, seed=3) == (records, [])
    assert split_validation(records, 0.5, seed=3, val=[99]) == (records, [99])
    with pytest.raises(EdgeTuneError, match="leaves no training records"):
        split_validation([1], 0.5, seed=0)


def test_eval_steps():
    from edge_tune.training.backends.cpu import eval_steps

    assert eval_steps(30, 0) == {6, 12, 18, 24, 30}
    assert eval_steps(10, 4) == {4, 8, 10}


def test_chat_template_and_system_mode_keys(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\ndata = "d.jsonl"\nchat-template = "chatml"\nsystem_mode = "fold"\n')
    cfg = build(toml)
    assert (cfg.chat_template, cfg.system_mode) == ("chatml", "fold")
    assert build(toml, chat_template="llama3").chat_template == "llama3"  # flags win
    assert build(None, data="d.jsonl").chat_template is None
    with pytest.raises(EdgeTuneError, match="system_mode: 'merge' is not valid"):
        build(None, data="d.jsonl", system_mode="merge")
