"""GGUF LoRA files made by llama.cpp's own ``convert_lora_to_gguf.py`` (the copy cached with the
installed llama-cpp-python's converter) load, validate and serve like edge-tune's, and the
shared check refuses the ones llama.cpp would abort on.

Measured, not assumed: llama.cpp's converter writes PEFT's ``lora_alpha`` as is, so an rsLoRA
adapter converted by it runs at the wrong scale (alpha/r instead of alpha/sqrt(r)); nothing in
the file shows it. edge-tune's own export of the same adapter is exact.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tests.helpers.adapter_helpers import TOKENS, hf_twin, peft_adapter, rel, untied_copy
from tests.helpers.cli import assert_one_line_error, run_cli

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# id, base, LoraConfig kwargs, outtype
CASES = [
    ("plain", "tied", dict(target_modules=ALL7), "f32"),
    ("q8_0", "tied", dict(target_modules=["q_proj", "down_proj"], r=32, lora_alpha=32), "q8_0"),
    ("embedding_untied", "untied", dict(target_modules=["embed_tokens", "v_proj"]), "f32"),
    ("embedding_tied", "tied", dict(target_modules=["embed_tokens", "v_proj"]), "f32"),
    ("rslora", "tied", dict(target_modules=ALL7, r=16, use_rslora=True), "f32"),
]


@pytest.fixture(scope="module")
def made(default_gguf, tmp_path_factory):
    """Each case as a PEFT adapter and as llama.cpp's converter writes it (converted
    concurrently: each run imports torch)."""
    from tests.helpers.tiny_models import tiny_llama_gguf

    from edge_tune.converters.integrations import hf_to_gguf

    conv = hf_to_gguf.converter_dir() / "convert_lora_to_gguf.py"
    if not conv.is_file():  # a cache from before the converter kept this script
        conv = hf_to_gguf.fetch_converter() / "convert_lora_to_gguf.py"
    d = tmp_path_factory.mktemp("llama-converter")
    tied = tiny_llama_gguf(d / "tied.gguf", default_gguf)
    bases = {"tied": tied, "untied": untied_copy(tied, d / "untied.gguf")}
    out, argvs = {}, []
    for case, base_kind, kw, outtype in CASES:
        model = hf_twin(bases[base_kind])
        hf = d / f"{case}-hf"
        model.config.save_pretrained(str(hf))  # the converter needs the base's config only
        tuned, base = peft_adapter(model, d / f"{case}-peft", **kw)
        gg = d / f"{case}.gguf"
        argvs.append([str(conv), str(d / f"{case}-peft"), "--base", str(hf),
                      "--outfile", str(gg), "--outtype", outtype])
        out[case] = dict(base=bases[base_kind], peft=d / f"{case}-peft", gguf=gg,
                         effect=tuned - base)
    # One process runs the script once per case, as `python convert_lora_to_gguf.py ARGS`
    # would (its own gguf-py first on sys.path): torch is imported once, not five times.
    driver = ("import json, os, runpy, sys\n"
              "jobs = json.loads(sys.argv[1])\n"
              "sys.path.insert(0, os.path.dirname(jobs[0][0]))\n"
              "for argv in jobs:\n"
              "    sys.argv = argv\n"
              "    runpy.run_path(argv[0], run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", driver, json.dumps(argvs)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def llama_effect(base, adapter):
    from edge_tune.llama.engine import Engine

    with Engine(base, n_ctx=64, logits_all=True, exact=True) as eng:
        plain = eng.logits(TOKENS)
        eng.activate(eng.add_adapter(adapter))
        return eng.logits(TOKENS) - plain, eng.adapter_meta[str(adapter)]


@pytest.mark.parametrize("case", ["plain", "q8_0", "embedding_untied"])
def test_llama_cpp_made_adapter_validates_and_matches_peft(made, case):
    m = made[case]
    got, meta = llama_effect(m["base"], m["gguf"])
    err = rel(got, m["effect"])
    print(f"{case}: llama.cpp-converted adapter effect error {err:.2e}")
    assert meta["made_by"] == "llama.cpp"
    assert err <= (0.03 if case == "q8_0" else 0.02)


def test_llama_cpp_made_tied_embedding_adapter_is_refused(made):
    """llama.cpp's converter writes it; llama.cpp then aborts on it (see the crash-proof
    test); the shared check refuses it in one line everywhere, naming the merge."""
    m = made["embedding_tied"]
    proc = run_cli("chat", "--adapter", str(m["gguf"]), "--base", str(m["base"]), "--prompt",
                   "hi", "--max-tokens", "2", timeout=300)
    assert_one_line_error(proc, "token_embd.weight", "tied", "--merge")
    out = m["gguf"].with_name("merged.gguf")
    proc = run_cli("export", str(m["peft"]), "--base", str(m["base"]), "--merge", "--quant",
                   "F32", "-o", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    from edge_tune.llama.engine import Engine

    with Engine(out, n_ctx=64, logits_all=True, exact=True) as eng, \
            Engine(m["base"], n_ctx=64, logits_all=True, exact=True) as plain:
        err = rel(eng.logits(TOKENS) - plain.logits(TOKENS), m["effect"])
    assert err <= 0.02


def test_rslora_from_llama_cpp_converter_is_off_and_edge_tunes_is_exact(made, tmp_path):
    from edge_tune import api

    m = made["rslora"]
    theirs, _ = llama_effect(m["base"], m["gguf"])
    api.export(m["peft"], base=m["base"], out=tmp_path / "ours.gguf")
    ours, meta = llama_effect(m["base"], tmp_path / "ours.gguf")
    e_theirs, e_ours = rel(theirs, m["effect"]), rel(ours, m["effect"])
    print(f"rsLoRA r=16: llama.cpp's converter {e_theirs:.2%} off, edge-tune {e_ours:.2e}")
    assert meta["made_by"] == "edge-tune"
    assert e_ours <= 0.02 and e_theirs > 0.5


def test_llama_cpp_made_adapter_chats_and_serves(made):
    from tests.helpers.serve_helpers import http_json, running_server

    m = made["plain"]
    proc = run_cli("chat", "--adapter", str(m["gguf"]), "--base", str(m["base"]), "--prompt",
                   "hi", "--max-tokens", "2", "--temperature", "0", timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    with running_server("--base", str(m["base"]), "--adapter", f"theirs={m['gguf']}") as srv:
        status, body = http_json("POST", srv.url + "/v1/chat/completions", json.dumps(
            {"model": "theirs", "max_tokens": 2, "temperature": 0,
             "messages": [{"role": "user", "content": "hi"}]}).encode(),
            {"Content-Type": "application/json"})
        assert status == 200, body
        assert body["choices"][0]["message"]["role"] == "assistant"


def test_verify_says_what_it_can_check_in_an_adapter_file(made):
    m = made["plain"]
    proc = run_cli("verify", str(m["gguf"]), "--base", str(m["base"]), timeout=300)
    assert_one_line_error(proc, "llama.cpp's convert_lora_to_gguf.py", "checked: it loads and "
                          "runs on", "not checked", "wrong scale", "does not record")
    m = made["embedding_tied"]
    proc = run_cli("verify", str(m["gguf"]), "--base", str(m["base"]), timeout=300)
    assert_one_line_error(proc, "token_embd.weight", "--merge")
