"""Adapters are checked against the base before llama.cpp sees them (a bad one segfaults)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_tune.converters.formats.base_info import from_gguf, open_gguf
from edge_tune.converters.formats.validate import validate_adapter_file
from edge_tune.errors import EdgeTuneError
from tests.helpers.gguf_helpers import q_pair, write_adapter


@pytest.fixture(scope="module")
def base(default_gguf):
    return from_gguf(default_gguf)


def test_good_adapter_passes(tmp_path, base):
    meta = validate_adapter_file(write_adapter(tmp_path / "a.gguf", "llama", q_pair()), base)
    assert meta["adapter.lora.alpha"] == 16.0


@pytest.mark.parametrize("case,message", [
    ("arch", "architecture 'qwen2' does not match"),
    ("shape", "do not fit base shape"),
    ("missing_b", "lora_b is missing"),
    ("unknown_tensor", "does not exist in the base model"),
    ("two_unknown", r"does not exist in the base model .*\(and 1 more problem\)$"),
    ("bad_suffix", "must end in .lora_a or .lora_b"),
    ("alpha_type", "FLOAT32"),
])
def test_bad_adapters_are_refused(tmp_path, base, case, message):
    tensors, arch, kw = q_pair(), "llama", {}
    if case == "arch":
        arch = "qwen2"
    elif case == "shape":
        tensors = q_pair(n_in=100)
    elif case == "missing_b":
        tensors = {k: v for k, v in tensors.items() if k.endswith("lora_a")}
    elif case == "unknown_tensor":
        tensors = q_pair(block=99)
    elif case == "two_unknown":
        tensors = {**q_pair(block=98), **q_pair(block=99)}
    elif case == "bad_suffix":
        tensors = {**tensors, "blk.0.attn_q.weight.lora_c": np.zeros((4, 4))}
    elif case == "alpha_type":
        kw = {"alpha_as_float32": False}
    path = write_adapter(tmp_path / "a.gguf", arch, tensors, **kw)
    with pytest.raises(EdgeTuneError, match=message):
        validate_adapter_file(path, base)


def test_truncated_files_are_refused(tmp_path, base, default_gguf):
    good = write_adapter(tmp_path / "a.gguf", "llama", q_pair())
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(EdgeTuneError, match="truncated or corrupt"):
        validate_adapter_file(cut, base)
    cut_base = tmp_path / "cut-base.gguf"
    with open(default_gguf, "rb") as f:
        cut_base.write_bytes(f.read(5_000_000))
    with pytest.raises(EdgeTuneError, match="truncated or corrupt"):
        open_gguf(cut_base)


def test_base_gguf_is_not_an_adapter(base, default_gguf):
    with pytest.raises(EdgeTuneError, match="not a LoRA adapter"):
        validate_adapter_file(default_gguf, base)
