"""An adapter GGUF with NaN or infinite weights: llama.cpp loads it without a word and then
every logit is NaN (chat printed nothing, serve answered an empty 200). The shared pre-load
check (``validate_adapter_file``) reads every value and names the tensor."""

from __future__ import annotations

import numpy as np
import pytest
from tests.helpers.cli import assert_one_line_error, run_cli
from tests.helpers.adapter_cases import Case, pair, write_case

from edge_tune.errors import EdgeTuneError


@pytest.fixture(scope="module")
def base(default_gguf, tmp_path_factory):
    from tests.helpers.tiny_models import tiny_llama_gguf

    return tiny_llama_gguf(tmp_path_factory.mktemp("nonfinite") / "base.gguf", default_gguf)


def _corrupted(tensors: dict, name: str, value: float, gtype: str) -> dict:
    """A copy of ``tensors`` (all written as ``gtype``) with one value of ``name`` set."""
    out = {k: v.copy() for k, v in tensors.items()}
    out[name][0, 1] = value
    return {k: (v, gtype) for k, v in out.items()}


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # quantizing the NaN
@pytest.mark.parametrize("gtype,part,value", [
    ("F32", "lora_a", np.nan), ("F16", "lora_b", np.inf), ("Q8_0", "lora_a", np.nan),
    ("BF16", "lora_b", -np.inf)])
def test_validator_refuses_non_finite_tensor_naming_it(base, tmp_path, gtype, part, value):
    from edge_tune.converters.formats.base_info import from_gguf
    from edge_tune.converters.formats.validate import validate_adapter_file

    info = from_gguf(base)
    good = pair("attn_v", 0, r=32)
    ok = write_case(Case("ok", True, {k: (v, gtype) for k, v in good.items()}),
                    tmp_path / "ok.gguf")
    validate_adapter_file(ok, info)  # the valid original passes
    name = f"blk.0.attn_v.weight.{part}"
    bad = write_case(Case("bad", False, _corrupted(good, name, value, gtype)),
                     tmp_path / "bad.gguf")
    with pytest.raises(EdgeTuneError, match=f"'{name}' has NaN or infinite values"):
        validate_adapter_file(bad, info)


def test_chat_refuses_a_nan_adapter_in_one_line(base, tmp_path):
    name = "blk.0.attn_v.weight.lora_a"
    bad = write_case(Case("nan", False, _corrupted(pair("attn_v"), name, np.nan, "F32")),
                     tmp_path / "nan.gguf")
    proc = run_cli("chat", "--adapter", str(bad), "--base", str(base), "--prompt", "hi",
                   "--max-tokens", "2", timeout=300)
    assert_one_line_error(proc, str(bad), f"'{name}'", "NaN or infinite")
