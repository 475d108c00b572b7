"""No adapter can take llama.cpp down: a table of valid and corrupted GGUF adapters, each either
refused in one line or run.

Over 200 adapters (wrong names, shapes, transposed or missing halves, embedding/output LoRA on
tied and untied bases, fused and ignored tensors, odd alpha types, extra tensors, bad headers,
truncated files) on two tiny F32 llama bases (tied, untied), and cases built from the own
tensors of every ``tiny_families`` base (all seven families). Each case says what llama.cpp does with it (``ok`` = runs and
computes the LoRA; anything else is a refusal), and the shared check must agree:

1. in-process, ``validate_adapter_file`` accepts exactly the ``ok`` cases and refuses every
   other with a one-line ``EdgeTuneError`` (never another exception);
2. in real llama.cpp, a few processes (``adapter_loader.py``) load every case one after
   another through ``Engine.add_adapter``: every accepted one answers with finite logits that
   the adapter changed, every other is refused before llama.cpp sees it, and no process dies;
3. the check is needed: a sample of refused cases loaded *around* it aborts or crashes
   llama.cpp, or runs and ignores the adapter;
4. the user's commands: ``edge-tune chat --adapter X --prompt hi`` (exit 0 or one line with
   exit 2) and ``edge-tune serve`` (refuses a bad adapter at start; serves the good ones).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.helpers.adapter_helpers import untied_copy
from tests.helpers.cli import assert_one_line_error, run_cli

from edge_tune.errors import EdgeTuneError
from tests.helpers.adapter_cases import Case, KINDS, pair, write_case

LOADER = Path(__file__).resolve().parents[1] / "helpers" / "adapter_loader.py"


def embd_pair(vocab: int, r: int = 4, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {"token_embd.weight.lora_a": rng.normal(size=(vocab, r)).astype(np.float32) * 0.3,
            "token_embd.weight.lora_b": rng.normal(size=(64, r)).astype(np.float32) * 0.3}


def output_pair(vocab: int, r: int = 4, seed: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    return {"output.weight.lora_a": rng.normal(size=(r, 64)).astype(np.float32) * 0.3,
            "output.weight.lora_b": rng.normal(size=(vocab, r)).astype(np.float32) * 0.3}


def cases(tied: bool, vocab: int) -> list[Case]:
    out: list[Case] = []
    add = out.append
    # --- valid: every projection, both blocks, several ranks and types ----------------------
    for kind in KINDS:
        for block in (0, 1):
            for r in (1, 4):
                add(Case(f"ok-{kind}-b{block}-r{r}", True, pair(kind, block, r)))
    everything = {k: v for kind in KINDS for b in (0, 1) for k, v in pair(kind, b, 8).items()}
    add(Case("ok-all-projections-r8", True, everything))
    for kind in ("attn_q", "ffn_down"):
        for gtype in ("F16", "BF16", "Q8_0"):
            p = pair(kind, 0, 32)
            add(Case(f"ok-{kind}-{gtype}", True, {k: (v, gtype) for k, v in p.items()}))
    add(Case("ok-negative-alpha", True, pair("attn_v"), alpha=("f32", -8.0)))
    add(Case("ok-big-alpha", True, pair("ffn_up"), alpha=("f32", 1e3)))
    add(Case("ok-rank-64", True, pair("attn_output", r=64)))
    add(Case("ok-other-kv", True, pair("attn_q"), kv={"general.name": "x", "foo.bar": "baz"}))
    # --- embedding and output layer --------------------------------------------------------
    add(Case("embd", not tied, embd_pair(vocab)))
    add(Case("embd-r1", not tied, embd_pair(vocab, 1)))
    add(Case("embd+q", not tied, {**embd_pair(vocab), **pair("attn_q")}))
    add(Case("output", not tied, output_pair(vocab)))
    add(Case("output-r2", not tied, output_pair(vocab, 2)))
    add(Case("embd+output", not tied, {**embd_pair(vocab), **output_pair(vocab)}))
    e = embd_pair(vocab)
    add(Case("embd-rank-mismatch", False, {"token_embd.weight.lora_a": e["token_embd.weight.lora_a"],
                                           "token_embd.weight.lora_b": e["token_embd.weight.lora_b"][:, :3]}))
    add(Case("embd-a-transposed", False, {"token_embd.weight.lora_a": e["token_embd.weight.lora_a"].T,
                                          "token_embd.weight.lora_b": e["token_embd.weight.lora_b"]}))
    add(Case("embd-b-transposed", False, {"token_embd.weight.lora_a": e["token_embd.weight.lora_a"],
                                          "token_embd.weight.lora_b": e["token_embd.weight.lora_b"].T}))
    add(Case("embd-linear-layout", False, {  # PEFT's Linear orientation, not llama.cpp's flip
        "token_embd.weight.lora_a": e["token_embd.weight.lora_a"].T.copy()[:, :64],
        "token_embd.weight.lora_b": e["token_embd.weight.lora_b"]}))
    add(Case("embd-wrong-vocab", False, embd_pair(vocab - 1)))
    o = output_pair(vocab)
    add(Case("output-transposed", False, {"output.weight.lora_a": o["output.weight.lora_b"].T,
                                          "output.weight.lora_b": o["output.weight.lora_a"].T}))
    # --- wrong names ---------------------------------------------------------------------
    q = pair("attn_q")
    ren = lambda d, old, new: {k.replace(old, new): v for k, v in d.items()}  # noqa: E731
    add(Case("name-block-out-of-range", False, ren(q, "blk.0.", "blk.2.")))
    add(Case("name-block-far", False, ren(q, "blk.0.", "blk.999.")))
    add(Case("name-typo", False, ren(q, "attn_q", "attn_qq")))
    add(Case("name-hf-style", False, ren(q, "blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj")))
    add(Case("name-no-weight", False, ren(q, ".weight.lora", ".lora")))
    add(Case("name-fused-qkv-on-llama", False,
             ren(pair("attn_q", n_out=128), "attn_q", "attn_qkv")))
    add(Case("name-experts", False, ren(pair("ffn_up"), "ffn_up", "ffn_up_exps")))
    add(Case("lora-on-attn-norm", False, {
        "blk.0.attn_norm.weight.lora_a": np.ones((1, 64), np.float32),
        "blk.0.attn_norm.weight.lora_b": np.ones((1, 1), np.float32)}))
    add(Case("lora-on-output-norm", False, {
        "output_norm.weight.lora_a": np.ones((1, 64), np.float32),
        "output_norm.weight.lora_b": np.ones((1, 1), np.float32)}))
    add(Case("suffix-lora_c", False, {**q, "blk.0.attn_q.weight.lora_c": np.ones((4, 4), np.float32)}))
    add(Case("suffix-upper", False, ren(q, ".lora_a", ".lora_A")))
    add(Case("extra-plain-tensor", False, {**q, "foo.weight": np.ones((4, 4), np.float32)}))
    add(Case("extra-norm-vector", False, {**q, "blk.0.attn_norm.weight": np.ones(64, np.float32)}))
    add(Case("norm-vector-only", False, {"blk.0.attn_norm.weight": np.full(64, 3.0, np.float32)}))
    add(Case("extra-base-weight", False, {**q, "blk.0.attn_q.weight": np.ones((64, 64), np.float32)}))
    add(Case("no-tensors", False, {}))
    # --- halves --------------------------------------------------------------------------
    for kind in ("attn_q", "attn_k", "ffn_down"):
        p = pair(kind, 1)
        add(Case(f"missing-a-{kind}", False, {k: v for k, v in p.items() if k.endswith("_b")}))
        add(Case(f"missing-b-{kind}", False, {k: v for k, v in p.items() if k.endswith("_a")}))
        add(Case(f"missing-b-{kind}-with-others", False,
                 {**pair("attn_v"), **{k: v for k, v in p.items() if k.endswith("_a")}}))
    # --- shapes --------------------------------------------------------------------------
    for kind in ("attn_q", "attn_k", "ffn_gate", "ffn_down"):
        i, o_ = KINDS[kind]
        p = pair(kind)
        a, b = p[f"blk.0.{kind}.weight.lora_a"], p[f"blk.0.{kind}.weight.lora_b"]
        n = f"blk.0.{kind}.weight"
        add(Case(f"shape-a-in-{kind}", False, pair(kind, n_in=i + 1)))
        add(Case(f"shape-b-out-{kind}", False, pair(kind, n_out=o_ * 2)))
        add(Case(f"shape-rank-mismatch-{kind}", False, {n + ".lora_a": a, n + ".lora_b": b[:, :3]}))
        add(Case(f"shape-a-transposed-{kind}", False, {n + ".lora_a": a.T.copy(), n + ".lora_b": b}))
        add(Case(f"shape-b-transposed-{kind}", False, {n + ".lora_a": a, n + ".lora_b": b.T.copy()}))
        add(Case(f"shape-both-transposed-{kind}", False,
                 {n + ".lora_a": a.T.copy(), n + ".lora_b": b.T.copy()}))
        add(Case(f"shape-swapped-{kind}", False, {n + ".lora_a": b, n + ".lora_b": a}))
        add(Case(f"shape-a-3d-{kind}", False, {n + ".lora_a": np.stack([a, a]), n + ".lora_b": b}))
        add(Case(f"shape-b-1d-{kind}", False, {n + ".lora_a": a[:1], n + ".lora_b": b[:, 0].copy()}))
    # --- tensor types --------------------------------------------------------------------
    for gtype in ("I32", "I8", "I16", "F64"):
        add(Case(f"type-{gtype}", False, {k: (v, gtype) for k, v in q.items()}))
    # --- alpha ---------------------------------------------------------------------------
    for kind, value in [("u32", 16), ("i32", 16), ("f64", 16.0), ("str", "16"), ("bool", True),
                        ("u8", 16), ("i64", 16), ("missing", None), ("f32", 0.0),
                        ("f32", float("nan")), ("f32", float("inf")), ("array", [16.0])]:
        add(Case(f"alpha-{kind}-{value}", False, pair("attn_k"), alpha=(kind, value)))
    # --- header ----------------------------------------------------------------------------
    add(Case("arch-qwen2", False, q, arch="qwen2"))
    add(Case("arch-phi3", False, q, arch="phi3"))
    add(Case("type-model", False, q, kv={"general.type": "model"}))
    add(Case("adapter-type-ia3", False, q, kv={"adapter.type": "ia3"}))
    add(Case("adapter-type-missing", False, q, kv={"adapter.type": None}))
    add(Case("alora", False, q, kv={"adapter.alora.invocation_tokens": [1, 2]}))
    # --- not a GGUF ------------------------------------------------------------------------
    add(Case("empty-file", False, raw=b""))
    add(Case("random-bytes", False, raw=bytes(np.random.default_rng(3).integers(0, 256, 4096,
                                                                               dtype=np.uint8))))
    add(Case("magic-only", False, raw=b"GGUF"))
    return out


def _rand_pair(target: str, shape: tuple, r: int = 4, seed: int = 0) -> dict:
    """A LoRA pair for base tensor ``target`` of ggml shape ``shape`` (numpy orientation)."""
    rng = np.random.default_rng(seed)
    n_in, n_out = shape[0], shape[1]
    if target == "token_embd.weight":  # llama.cpp's flipped layout
        return {target + ".lora_a": rng.normal(size=(n_out, r)).astype(np.float32) * 0.3,
                target + ".lora_b": rng.normal(size=(n_in, r)).astype(np.float32) * 0.3}
    return {target + ".lora_a": rng.normal(size=(r, n_in)).astype(np.float32) * 0.3,
            target + ".lora_b": rng.normal(size=(n_out, r)).astype(np.float32) * 0.3}


def family_cases(info) -> list[Case]:
    """Cases built from a family base's own tensors: every projection it has (phi3: fused
    attn_qkv and 2 x n_ff ffn_up), embedding/output per its tying, tensors its graph ignores
    (q/k norms, biases), tensors it does not have, broken halves and shapes."""
    from edge_tune.converters.formats.lora_graph import MATMUL_KINDS

    t, arch, out = info.tensors, info.arch, []
    mats = sorted(n for n in t if n.startswith("blk.0.") and n.endswith(".weight")
                  and n.split(".")[2] in MATMUL_KINDS)
    for name in mats + (["output.weight"] if "output.weight" in t else []):
        out.append(Case(f"{arch}-ok-{name}", True, _rand_pair(name, t[name]), arch=arch))
    out.append(Case(f"{arch}-ok-all", True, {k: v for n in mats for k, v in
                                           _rand_pair(n, t[n], 8).items()}, arch=arch))
    out.append(Case(f"{arch}-embd", not info.tied_embeddings,
                    _rand_pair("token_embd.weight", t["token_embd.weight"]), arch=arch))
    ignored = [n for n in t if n.startswith("blk.0.") and (n.endswith(".bias") or "norm" in n)]
    for name in ignored:
        shape = (t[name][0], 1)
        out.append(Case(f"{arch}-ignored-{name}", False, _rand_pair(name, shape, 1), arch=arch))
    other = "blk.0.attn_q.weight" if "blk.0.attn_qkv.weight" in t else "blk.0.attn_qkv.weight"
    out.append(Case(f"{arch}-absent-{other}", False, _rand_pair(other, (64, 192)), arch=arch))
    q = mats[0]
    good = _rand_pair(q, t[q])
    a, b = good[q + ".lora_a"], good[q + ".lora_b"]
    out += [Case(f"{arch}-a-transposed", False, {q + ".lora_a": a.T.copy(), q + ".lora_b": b},
                 arch=arch),
            Case(f"{arch}-b-transposed", False, {q + ".lora_a": a, q + ".lora_b": b.T.copy()},
                 arch=arch),
            Case(f"{arch}-rank-mismatch", False, {q + ".lora_a": a, q + ".lora_b": b[:, :2]},
                 arch=arch),
            Case(f"{arch}-missing-b", False, {q + ".lora_a": a}, arch=arch),
            Case(f"{arch}-alpha-u32", False, good, alpha=("u32", 16), arch=arch),
            Case(f"{arch}-wrong-arch", False, good, arch="llama" if arch != "llama" else "qwen2"),
            Case(f"{arch}-norm-vector", False, {**good, "blk.0.attn_norm.weight":
                                                np.ones(t["blk.0.attn_norm.weight"][0],
                                                        np.float32)}, arch=arch)]
    return out


def truncated(src: Path, dst: Path, frac: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * frac)])
    return dst


@pytest.fixture(scope="module")
def table(default_gguf, tmp_path_factory):
    """{base name: (base path, [(Case, adapter path)])}."""
    from tests.helpers.tiny_models import tiny_llama_gguf

    from edge_tune.converters.formats.base_info import from_gguf

    d = tmp_path_factory.mktemp("crash")
    tied = tiny_llama_gguf(d / "tied.gguf", default_gguf)
    bases = {"tied": tied, "untied": untied_copy(tied, d / "untied.gguf")}
    out = {}
    for name, path in bases.items():
        info = from_gguf(path)
        vocab = info.tensors["token_embd.weight"][1]
        rows = []
        for i, case in enumerate(cases(name == "tied", vocab)):
            rows.append((case, write_case(case, d / f"{name}-{i:03d}.gguf")))
        good = rows[0][1]
        for frac in (0.1, 0.5, 0.99):
            rows.append((Case(f"truncated-{frac}", False), truncated(good, d / f"{name}-cut{frac}.gguf",
                                                                     frac)))
        rows.append((Case("base-as-adapter", False), path))
        out[name] = (path, info, rows)
    from tests.helpers.tiny_families import NAMES, family_gguf

    # Every family's own graph: biases (qwen2), q/k norms (qwen3, gemma3), output always the
    # embedding (gemma2), fused attn_qkv / ffn_up (phi3), untied RoPE-permuted (llama, mistral).
    for name in NAMES:
        path = family_gguf(name)
        info = from_gguf(path)
        out[name] = (path, info, [(c, write_case(c, d / f"{name}-{i:03d}.gguf"))
                                  for i, c in enumerate(family_cases(info))])
    return out


def test_table_has_over_200_cases(table):
    n = sum(len(rows) for _, _, rows in table.values())
    print(f"{n} adapters")
    assert n >= 200


def test_validator_accepts_exactly_what_llama_cpp_computes(table):
    from edge_tune.converters.formats.validate import validate_adapter_file

    wrong = []
    for base_name, (_, info, rows) in table.items():
        for case, path in rows:
            try:
                validate_adapter_file(path, info)
                accepted, msg = True, ""
            except EdgeTuneError as exc:
                accepted, msg = False, str(exc)
                assert "\n" not in msg and msg.startswith(str(path)), msg
            if accepted != case.ok:
                wrong.append(f"{base_name}/{case.id}: {'accepted' if accepted else msg}")
    assert not wrong, "\n".join(wrong)


def run_loader(base: Path, adapters: list[Path], mode: str, tmp: Path) -> dict[int, dict]:
    """Every adapter through ``adapter_loader.py``; a process llama.cpp takes down is restarted
    after the adapter that did it, recorded as {"status": "crash", "rc": ...}."""
    jobs = tmp / f"jobs-{mode}-{base.stem}.json"
    jobs.write_text(json.dumps({"base": str(base), "mode": mode,
                                "adapters": [str(p) for p in adapters]}))
    results: dict[int, dict] = {}
    start = 0
    while start < len(adapters):
        proc = subprocess.run([sys.executable, str(LOADER), str(jobs),
                               str(start)], capture_output=True, text=True, timeout=600)
        started = None
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                started = int(line.split()[1])
            elif line.startswith("{"):
                r = json.loads(line)
                results[r["i"]] = r
        if proc.returncode == 0:
            break
        assert started is not None and started not in results, proc.stderr[-2000:]
        results[started] = {"i": started, "status": "crash", "rc": proc.returncode,
                            "traceback": "Traceback" in proc.stderr}
        start = started + 1
    return results


def test_every_case_in_llama_cpp_is_refused_or_runs(table, tmp_path):
    bad = []
    for base_name, (base, _, rows) in table.items():
        results = run_loader(base, [p for _, p in rows], "checked", tmp_path)
        for i, (case, _) in enumerate(rows):
            r = results.get(i, {"status": "missing"})
            if case.ok:
                good = r["status"] == "ok" and r["finite"] and r["effect"] > 1e-4
            else:
                good = r["status"] == "refused" and r["one_line"]
            if not good:
                bad.append(f"{base_name}/{case.id}: {r}")
    assert not bad, "\n".join(bad)


BYPASS = ["embd", "embd-rank-mismatch", "alpha-u32-16", "lora-on-attn-norm", "alpha-f32-0.0",
          "norm-vector-only"]


def test_without_the_check_llama_cpp_crashes_or_ignores_the_adapter(table, tmp_path):
    """The refused cases are refused for a reason: loaded around the check, llama.cpp aborts
    (tied embedding LoRA, embedding rank mismatch, a non-FLOAT32 alpha) or runs and computes
    something else (a LoRA on a norm and a norm vector are ignored; alpha 0 applies scale 1)."""
    base, _, rows = table["tied"]
    picked = [(c, p) for c, p in rows if c.id in BYPASS]
    assert len(picked) == len(BYPASS)
    results = run_loader(base, [p for _, p in picked], "bypass", tmp_path)
    by_id = {c.id: results[i] for i, (c, _) in enumerate(picked)}
    print(json.dumps(by_id, indent=1))
    for cid in ("embd", "embd-rank-mismatch", "alpha-u32-16"):
        assert by_id[cid]["status"] == "crash" and by_id[cid]["rc"] < 0, (cid, by_id[cid])
        assert not by_id[cid]["traceback"]
    for cid in ("lora-on-attn-norm", "norm-vector-only"):
        assert by_id[cid]["status"] == "ok" and by_id[cid]["effect"] == 0.0, (cid, by_id[cid])
    # alpha 0 runs at scale 1: the same adapter at alpha = rank (scale 1) has the same effect.
    assert by_id["alpha-f32-0.0"]["status"] == "ok" and by_id["alpha-f32-0.0"]["effect"] > 0


# --- the user's commands ---------------------------------------------------------------------

def _case(table, base_name, cid):
    base, _, rows = table[base_name]
    return base, next(p for c, p in rows if c.id == cid)


@pytest.mark.parametrize("base_name,cid,needles", [
    ("tied", "embd", ["token_embd.weight", "tied", "--merge"]),
    ("tied", "output", ["output.weight", "tied", "--merge"]),
    ("untied", "alpha-u32-16", ["adapter.lora.alpha", "FLOAT32"]),
    ("untied", "truncated-0.5", ["truncated or corrupt"]),
])
def test_chat_refuses_in_one_line(table, base_name, cid, needles):
    base, adapter = _case(table, base_name, cid)
    proc = run_cli("chat", "--adapter", str(adapter), "--base", str(base), "--prompt", "hi",
                   "--max-tokens", "2", timeout=300)
    assert_one_line_error(proc, *needles)


@pytest.mark.parametrize("base_name,cid", [("untied", "embd+output"), ("tied", "ok-all-projections-r8")])
def test_chat_answers(table, base_name, cid):
    base, adapter = _case(table, base_name, cid)
    proc = run_cli("chat", "--adapter", str(adapter), "--base", str(base), "--prompt", "hi",
                   "--max-tokens", "2", "--temperature", "0", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_refuses_a_bad_adapter_at_start_and_serves_good_ones(table):
    from tests.helpers.serve_helpers import http_json, running_server

    base, good = _case(table, "tied", "ok-all-projections-r8")
    _, bad = _case(table, "tied", "embd")
    proc = run_cli("serve", "--base", str(base), "--adapter", f"good={good}",
                   "--adapter", f"bad={bad}", "--port", "8765", timeout=300)
    assert_one_line_error(proc, "token_embd.weight", "--merge")
    with running_server("--base", str(base), "--adapter", f"good={good}") as server:
        for model in ("good", "base", "good"):
            status, body = http_json("POST", server.url + "/v1/chat/completions", json.dumps(
                {"model": model, "max_tokens": 2, "temperature": 0,
                 "messages": [{"role": "user", "content": "hi"}]}).encode(),
                {"Content-Type": "application/json"})
            assert status == 200, body
        assert server.proc.poll() is None
