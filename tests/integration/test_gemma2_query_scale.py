"""Gemma 2's query scale: llama.cpp's gemma2 graph scales queries by 1/sqrt(head_dim) (or
1/sqrt(hidden/heads) at 46 blocks) and a GGUF has no key for another value, so
``convert-base`` refuses a config whose ``query_pre_attn_scalar`` differs: the GGUF would
compute something else than the HF model (no conversion is needed to see it)."""

from __future__ import annotations

import json

from tests.helpers.cli import assert_one_line_error, run_cli
from tests.helpers.tiny_families import build_hf


def test_query_scale_problem_follows_llama_cpp_gemma2_rule():
    from edge_tune.gguf_config import query_scale_problem

    small = {"model_type": "gemma2", "hidden_size": 64, "num_attention_heads": 4,
             "head_dim": 16, "num_hidden_layers": 2}
    assert query_scale_problem(dict(small, query_pre_attn_scalar=16)) is None
    problem = query_scale_problem(dict(small, query_pre_attn_scalar=256))
    assert "query_pre_attn_scalar: 256" in problem and "head_dim (16)" in problem
    assert "expected 16" in problem
    # 27B layout: hidden/heads (4608/32 = 144), not head_dim (128)
    big = {"model_type": "gemma2", "hidden_size": 4608, "num_attention_heads": 32,
           "head_dim": 128, "num_hidden_layers": 46}
    assert query_scale_problem(dict(big, query_pre_attn_scalar=144)) is None
    assert "expected 144" in query_scale_problem(dict(big, query_pre_attn_scalar=128))
    assert query_scale_problem({"model_type": "llama", "hidden_size": 64,
                                "num_attention_heads": 4}) is None


def test_convert_base_refuses_gemma2_query_scale_llama_cpp_cannot_run(tmp_path):
    hf = build_hf("gemma2", tmp_path / "gemma2")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["query_pre_attn_scalar"] = 256  # transformers' default; head_dim is 16
    (hf / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "g2.gguf"
    proc = run_cli("convert-base", str(hf), "-o", str(out), "--outtype", "f32")
    assert_one_line_error(proc, "config.json: query_pre_attn_scalar: 256", "head_dim (16)",
                          "expected 16")
    assert not out.exists() and list(tmp_path.iterdir()) == [hf]
