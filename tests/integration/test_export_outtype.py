"""`export --merge --outtype T` writes the merged GGUF as T (the same as `-q T`); the two given
with different types is a one-line error. A tiny random Llama and a random PEFT adapter."""

from __future__ import annotations

import pytest
from tests.helpers.adapter_helpers import hf_twin, peft_adapter
from tests.helpers.cli import assert_one_line_error, run_cli
from tests.helpers.tiny_models import tiny_llama_gguf


@pytest.fixture(scope="module")
def tiny_peft(default_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("outtype")
    base = tiny_llama_gguf(root / "tiny.gguf", default_gguf)
    peft_adapter(hf_twin(base), root / "peft", target_modules=["q_proj", "v_proj"])
    return base, root / "peft"


def matrix_types(path) -> set[str]:
    import gguf

    return {gguf.GGMLQuantizationType(t.tensor_type).name
            for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2}


def test_outtype_with_merge_is_the_merged_type(tiny_peft, tmp_path):
    base, peft = tiny_peft
    outtype, want = "f32", "F32"  # was written as F16 (the merge default), silently
    out = tmp_path / "m.gguf"
    proc = run_cli("export", str(peft), "--base", str(base), "--merge", "--outtype", outtype,
                   "-o", str(out), "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert f", {want}, " in proc.stderr + proc.stdout
    assert want in matrix_types(out) and "F16" not in matrix_types(out)


def test_outtype_and_a_different_quant_is_one_line(tiny_peft, tmp_path):
    base, peft = tiny_peft
    proc = run_cli("export", str(peft), "--base", str(base), "--merge", "--outtype", "f32",
                   "-q", "Q8_0", "-o", str(tmp_path / "m.gguf"), "--no-verify")
    assert_one_line_error(proc, "--outtype f32 and -q Q8_0")
    assert not any(tmp_path.iterdir())
