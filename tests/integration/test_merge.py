"""Merged export: base GGUF + PEFT adapter -> one GGUF, exact against llama.cpp's own LoRA path.

The merged F32 file is made from the real Q4_1 default model (dequantized tensor by tensor), so
it must equal the F32 copy of that model plus the GGUF adapter, run by llama.cpp, to float
rounding. DoRA has no GGUF LoRA form, so it is checked against PEFT itself.
"""

from __future__ import annotations

import numpy as np
import pytest
from tests.helpers.cli import assert_one_line_error, run_cli

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        "The capital of France is Paris, a city on the Seine")


@pytest.fixture(scope="module")
def base_model(hf_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)


@pytest.fixture(scope="module")
def tokens(f32_base):
    from edge_tune.llama.engine import Engine

    with Engine(f32_base, n_ctx=256) as eng:
        return eng.tokenize(TEXT)


def make_adapter(base_model, tokens, out_dir, **lora_kw):
    """A random non-zero adapter on all seven projections, saved as PEFT; returns PEFT's
    (tuned - base) logits on ``tokens``."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=TARGETS,
                     **lora_kw)
    model = get_peft_model(base_model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.mul_(0.5 if "lora_A" in name else 0.03)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.05 * torch.randn_like(p))  # move DoRA off its identity start
        ids = torch.tensor([tokens])
        tuned = model(ids).logits[0].numpy()
        with model.disable_adapter():
            base = model(ids).logits[0].numpy()
    model.save_pretrained(str(out_dir))
    model.unload()
    return tuned - base


def llama_logits(model_path, tokens, adapter=None):
    from edge_tune.llama.engine import Engine

    with Engine(model_path, n_ctx=256, logits_all=True, exact=True) as eng:
        if adapter is not None:
            eng.activate(eng.add_adapter(adapter))
        return eng.logits(tokens)


def rel(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def merge_dir(default_gguf, peft_dir, out, quant="F32"):
    from edge_tune import api

    return api.export(peft_dir, base=default_gguf, out=out, merge=True, quant=quant,
                      verify=False)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_merged_f32_equals_base_plus_adapter(base_model, tokens, default_gguf, f32_base,
                                             tmp_path, rslora):
    from edge_tune.converters.formats import base_info, peft_to_gguf

    make_adapter(base_model, tokens, tmp_path / "peft", use_rslora=rslora)
    peft_to_gguf.convert(tmp_path / "peft", base_info.from_gguf(f32_base), tmp_path / "a.gguf")
    merged = tmp_path / "merged.gguf"
    merge_dir(default_gguf, tmp_path / "peft", merged)
    want = llama_logits(f32_base, tokens, tmp_path / "a.gguf")
    base = llama_logits(f32_base, tokens)
    got = llama_logits(merged, tokens)
    err, effect_err = rel(got, want), rel(got - base, want - base)
    print(f"merged vs base+adapter: logits {err:.2e}, adapter effect {effect_err:.2e}")
    assert np.linalg.norm(want - base) > 1.0  # the adapter really changes the logits
    assert err <= 1e-3
    assert effect_err <= 1e-2


def test_merge_without_qk_permutation_is_caught(base_model, tokens, default_gguf, f32_base,
                                                tmp_path, monkeypatch):
    from edge_tune.converters.formats import base_info, merge, peft_to_gguf

    make_adapter(base_model, tokens, tmp_path / "peft")
    peft_to_gguf.convert(tmp_path / "peft", base_info.from_gguf(f32_base), tmp_path / "a.gguf")
    monkeypatch.setattr(merge, "needs_rope_permute", lambda arch, name: None)
    merge_dir(default_gguf, tmp_path / "peft", tmp_path / "wrong.gguf")
    base = llama_logits(f32_base, tokens)
    want = llama_logits(f32_base, tokens, tmp_path / "a.gguf") - base
    assert rel(llama_logits(tmp_path / "wrong.gguf", tokens) - base, want) > 0.05


def test_dora_merge_matches_peft(base_model, tokens, default_gguf, f32_base, tmp_path):
    want = make_adapter(base_model, tokens, tmp_path / "peft", use_dora=True)
    merged = tmp_path / "dora.gguf"
    merge_dir(default_gguf, tmp_path / "peft", merged)
    got = llama_logits(merged, tokens) - llama_logits(f32_base, tokens)
    err = rel(got, want)
    print(f"DoRA merged vs PEFT: adapter effect {err:.2e}")
    assert np.linalg.norm(want) > 1.0
    assert err <= 0.02


@pytest.fixture(scope="module")
def peft_dir(base_model, tokens, tmp_path_factory):
    path = tmp_path_factory.mktemp("peft") / "adapter"
    make_adapter(base_model, tokens, path)
    return path


def test_q4_k_m_export_keeps_metadata_loads_and_chats(peft_dir, default_gguf, tmp_path):
    import gguf

    from edge_tune.llama.engine import Engine

    out = tmp_path / "merged-q4km.gguf"
    proc = run_cli("export", str(peft_dir), "--base", str(default_gguf), "--merge",
                   "--quant", "Q4_K_M", "-o", str(out), "--no-verify")
    assert proc.returncode == 0, proc.stderr
    src, dst = gguf.GGUFReader(str(default_gguf)), gguf.GGUFReader(str(out))
    for key in ("tokenizer.chat_template", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.eos_token_id", "llama.rope.freq_base", "general.name"):
        assert dst.fields[key].contents() == src.fields[key].contents(), key
    assert dst.fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    types = {gguf.GGMLQuantizationType(t.tensor_type).name for t in dst.tensors}
    assert "Q4_K" in types or "Q5_0" in types  # 576-wide rows fall back from K-quants
    assert sorted(t.name for t in dst.tensors) == sorted(t.name for t in src.tensors)
    with Engine(out, n_ctx=256) as eng:
        reply = eng.chat([{"role": "user", "content": "Say hello."}], temperature=0,
                         max_tokens=8)
    assert reply.strip()
    assert list(tmp_path.iterdir()) == [out]  # no temporary left beside it


def test_f16_export_is_written_natively(peft_dir, default_gguf, tmp_path):
    import gguf

    out = tmp_path / "m16.gguf"
    merge_dir(default_gguf, peft_dir, out, quant="f16")
    r = gguf.GGUFReader(str(out))
    kinds = {(len(t.shape), gguf.GGMLQuantizationType(t.tensor_type).name) for t in r.tensors}
    assert kinds == {(1, "F32"), (2, "F16")}


# --- bad input: one line, exit 2, nothing left behind -----------------------------------------

def _no_output(tmp_path):
    return [p.name for p in tmp_path.iterdir() if p.name != "in"] == []


def test_unsupported_quant_type(peft_dir, default_gguf, tmp_path):
    proc = run_cli("export", str(peft_dir), "--base", str(default_gguf), "--merge", "--quant",
                   "IQ1_S", "-o", str(tmp_path / "x.gguf"), "--no-verify")
    assert_one_line_error(proc, "--quant", "IQ1_S", "Q4_K_M")
    assert not any(tmp_path.iterdir())


def test_truncated_base(peft_dir, default_gguf, tmp_path):
    (tmp_path / "in").mkdir()
    cut = tmp_path / "in" / "cut.gguf"
    cut.write_bytes(default_gguf.read_bytes()[: 40 << 20])
    proc = run_cli("export", str(peft_dir), "--base", str(cut), "--merge", "-o",
                   str(tmp_path / "x.gguf"), "--no-verify")
    assert_one_line_error(proc, "cut.gguf", "truncated or corrupt")
    assert _no_output(tmp_path)


def test_corrupt_adapter_safetensors(peft_dir, default_gguf, tmp_path):
    import shutil

    bad = tmp_path / "in"
    shutil.copytree(peft_dir, bad)
    st = bad / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    proc = run_cli("export", str(bad), "--base", str(default_gguf), "--merge", "-o",
                   str(tmp_path / "x.gguf"), "--no-verify")
    assert_one_line_error(proc, "adapter_model.safetensors")
    assert _no_output(tmp_path)


def test_adapter_of_another_shape(default_gguf, tmp_path):
    """A llama adapter whose q_proj is 64 wide (another model) is refused before writing."""
    import json

    from safetensors.numpy import save_file

    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    pre = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{pre}.lora_A.weight": np.ones((4, 64), np.float32),
               f"{pre}.lora_B.weight": np.ones((64, 4), np.float32)},
              str(bad / "adapter_model.safetensors"))
    proc = run_cli("export", str(bad), "--base", str(default_gguf), "--merge", "-o",
                   str(tmp_path / "x.gguf"), "--no-verify")
    assert_one_line_error(proc, "does not fit", "blk.0.attn_q.weight")
    assert _no_output(tmp_path)


def test_base_with_missing_tensor(peft_dir, default_gguf, tmp_path):
    import gguf
    from edge_tune.converters.formats.base_info import writing_gguf

    (tmp_path / "in").mkdir()
    holed = tmp_path / "in" / "holed.gguf"
    src = gguf.GGUFReader(str(default_gguf))
    with writing_gguf(holed, "llama") as w:
        for key, f in src.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            sub = {"sub_type": f.types[-1]} if f.types[0] == gguf.GGUFValueType.ARRAY else {}
            w.add_key_value(key, f.contents(), f.types[0], **sub)
        for t in src.tensors:
            if t.name != "blk.7.ffn_up.weight":
                w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    proc = run_cli("export", str(peft_dir), "--base", str(holed), "--merge", "-o",
                   str(tmp_path / "x.gguf"), "--no-verify")
    assert_one_line_error(proc, "holed.gguf", "blk.7.ffn_up.weight")
    assert _no_output(tmp_path)


def test_not_enough_disk(peft_dir, default_gguf, tmp_path, monkeypatch):
    """The free-space check runs before anything is written (the filesystem's answer is
    simulated: a real full disk cannot be made without root)."""
    import shutil
    from collections import namedtuple

    from edge_tune.errors import EdgeTuneError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 50 << 20))
    with pytest.raises(EdgeTuneError, match="not enough (free )?disk space"):
        merge_dir(default_gguf, peft_dir, tmp_path / "x.gguf", quant="Q8_0")
    assert not any(tmp_path.iterdir())


def test_merge_peak_memory_under_twice_the_f32_size(peft_dir, default_gguf, tmp_path):
    """Streamed: a fresh process merging and quantizing the default model stays well under
    2x the F32 file's size in peak RSS (the whole F32 model is never in memory)."""
    import json
    import subprocess
    import sys

    import gguf

    out = tmp_path / "m.gguf"
    code = ("import json\nfrom edge_tune import api\n"
            f"api.export({str(peft_dir)!r}, base={str(default_gguf)!r}, out={str(out)!r}, "
            "merge=True, quant='Q8_0')\n"
            # VmHWM, not ru_maxrss: Linux carries the forking parent's (pytest's, with a model
            # loaded) peak into the child's ru_maxrss across exec; VmHWM belongs to the new mm.
            "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0]\n"
            "print(json.dumps(int(hwm.split()[1]) * 1024))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    f32_size = sum(int(np.prod(t.shape)) * 4 for t in gguf.GGUFReader(str(default_gguf)).tensors)
    print(f"peak RSS {rss / 2**20:.0f} MiB, F32 size {f32_size / 2**20:.0f} MiB")
    assert rss < 2 * f32_size
