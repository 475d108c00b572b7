"""``convert-base`` round trip per family: tiny random HF model -> GGUF (llama.cpp's converter
from the installed llama-cpp-python's sdist) -> llama.cpp logits equal transformers' on F32.

Tokenizers are built here, no hub: BPE families reuse the default model's byte-level BPE
(SmolLM2's, whose pre-tokenizer llama.cpp recognizes); SentencePiece families get a real
SentencePiece model trained in memory on a small corpus, with the family's control tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tests.helpers.cli import assert_one_line_error, run_cli
from tests.helpers.family_models import FAMILIES, build_tiny

TEXT = "The quick pirate jumps over the treasure: 42 dozen jugs!"


@pytest.fixture(scope="module", autouse=True)
def converter() -> Path:
    """llama.cpp's converter, in the cache where `make install` puts it (fetched here when a
    bare `pytest` runs before it)."""
    from edge_tune.converters.integrations import hf_to_gguf

    return hf_to_gguf.converter_dir(fetch=True)




def reference_tokens(family: str, model_dir: Path) -> list[int]:
    if FAMILIES[family][2] == "bpe":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir))(TEXT, add_special_tokens=False)[
            "input_ids"]
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model")).encode(TEXT)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_logits_match_transformers(family, hf_dir, tmp_path):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from edge_tune.llama.engine import Engine

    model_dir = build_tiny(family, tmp_path / family, hf_dir)
    out = tmp_path / f"{family}.gguf"
    proc = run_cli("convert-base", str(model_dir), "-o", str(out), "--outtype", "f32")
    assert proc.returncode == 0, proc.stderr

    reader = gguf.GGUFReader(str(out))
    field = lambda k: reader.fields[k].contents()
    assert field("tokenizer.ggml.model") == ("gpt2" if FAMILIES[family][2] == "bpe" else "llama")
    assert field("tokenizer.chat_template") == FAMILIES[family][3]
    assert field("tokenizer.ggml.eos_token_id") == (1 if family == "gemma" else 2)

    want_ids = reference_tokens(family, model_dir)
    with Engine(out, n_ctx=128, logits_all=True, exact=True) as eng:
        assert eng.tokenize(TEXT) == want_ids  # the tokenizer came across
        bos = field("tokenizer.ggml.bos_token_id")
        ids = [bos] + want_ids
        got = eng.logits(ids)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print(f"{family}: relative logit error {err:.2e} over {len(ids)} tokens")
    assert np.linalg.norm(want) > 1.0
    assert err <= 1e-3


def test_quantized_outtype_goes_through_llama_cpp(hf_dir, tmp_path):
    import gguf

    model_dir = build_tiny("qwen2", tmp_path / "m", hf_dir)
    out = tmp_path / "q.gguf"
    proc = run_cli("convert-base", str(model_dir), "-o", str(out), "--outtype", "q8_0")
    assert proc.returncode == 0, proc.stderr
    types = {gguf.GGMLQuantizationType(t.tensor_type).name
             for t in gguf.GGUFReader(str(out)).tensors}
    assert "Q8_0" in types


def test_bad_inputs(hf_dir, tmp_path):
    model_dir = build_tiny("qwen3", tmp_path / "m", hf_dir)
    st = model_dir / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    out = tmp_path / "x.gguf"
    assert_one_line_error(run_cli("convert-base", str(model_dir), "-o", str(out)),
                          "model.safetensors", "truncated or corrupt")
    st.unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"pickle")
    assert_one_line_error(run_cli("convert-base", str(model_dir), "-o", str(out)),
                          "safetensors only")
    assert_one_line_error(run_cli("convert-base", str(hf_dir), "-o", str(out), "--outtype",
                                  "IQ2_XXS"), "IQ2_XXS")
    assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))


def test_unknown_architecture_is_one_line(hf_dir, tmp_path):
    model_dir = build_tiny("qwen2", tmp_path / "m", hf_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "x.gguf"
    proc = run_cli("convert-base", str(model_dir), "-o", str(out))
    assert_one_line_error(proc, "NoSuchModelForCausalLM", "not supported by llama.cpp's converter")
    assert not out.exists()


def test_convert_base_is_offline_without_the_converter(hf_dir, tmp_path):
    """No converter in the cache and a local model: one line naming the command that installs
    it, no download attempted (the cache stays empty), no output."""
    model_dir = build_tiny("qwen2", tmp_path / "m", hf_dir)
    cache = tmp_path / "cache"
    out = tmp_path / "x.gguf"
    proc = run_cli("convert-base", str(model_dir), "-o", str(out),
                   env={"EDGE_TUNE_CACHE": str(cache), "PIP_INDEX_URL": "http://127.0.0.1:9/"})
    assert_one_line_error(proc, "edge-tune fetch-converter", "not installed")
    assert not out.exists() and not (cache / "llama.cpp-convert").exists()


def test_fetch_converter_from_a_local_sdist(hf_dir, converter, tmp_path):
    """fetch-converter --sdist: the converter tree out of a llama-cpp-python sdist (built here
    from the cached tree, with the sdist's layout), then convert-base works from that cache;
    an sdist of another version is refused in one line."""
    import tarfile

    from edge_tune.converters.integrations.hf_to_gguf import llama_cpp_version

    version = llama_cpp_version()
    sdist = tmp_path / f"llama_cpp_python-{version}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(converter, arcname=f"llama_cpp_python-{version}/vendor/llama.cpp")
        tar.add(Path(__file__), arcname=f"llama_cpp_python-{version}/llama_cpp/other.py")
    cache = tmp_path / "cache"
    env = {"EDGE_TUNE_CACHE": str(cache)}
    proc = run_cli("fetch-converter", "--sdist", str(sdist), env=env)
    assert proc.returncode == 0, proc.stderr
    got = cache / "llama.cpp-convert" / version
    assert (got / "convert_hf_to_gguf.py").read_bytes() == \
        (converter / "convert_hf_to_gguf.py").read_bytes()
    assert (got / "gguf-py" / "gguf" / "gguf_writer.py").is_file()
    assert not list(got.rglob("other.py"))  # only the converter's files are kept
    model_dir = build_tiny("qwen2", tmp_path / "m", hf_dir)
    out = tmp_path / "q.gguf"
    proc = run_cli("convert-base", str(model_dir), "-o", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0

    other = tmp_path / "llama_cpp_python-0.0.1.tar.gz"
    other.write_bytes(sdist.read_bytes())
    assert_one_line_error(run_cli("fetch-converter", "--sdist", str(other), env=env),
                          "llama_cpp_python-0.0.1.tar.gz", f"llama_cpp_python-{version}.tar.gz")
    broken = tmp_path / "b" / sdist.name
    broken.parent.mkdir()
    broken.write_bytes(sdist.read_bytes()[:1000])
    shutil.rmtree(got)
    assert_one_line_error(run_cli("fetch-converter", "--sdist", str(broken), env=env),
                          "not a readable sdist")
    assert not got.exists()
