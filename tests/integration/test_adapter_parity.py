"""Every PEFT LoRA shape people save: llama.cpp computes what PEFT computes, or it is refused.

Tiny F32 llama bases (tied, and an untied copy) and their exact torch twins
(``adapter_helpers``). For each shape a random non-zero PEFT adapter is made with PEFT itself;
its GGUF export run by llama.cpp must reproduce PEFT's adapter effect (tuned − base logits,
adapter unmerged) within 2 %, and a ``--merge`` export must reproduce PEFT's tuned logits
within 1e-3 relative. Shapes with no GGUF LoRA form must be refused in one line naming
``--merge``, and that merge must then work.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.helpers.adapter_helpers import TOKENS, hf_twin, peft_adapter, rel, untied_copy

from edge_tune.errors import EdgeTuneError

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MERGE = "--merge"
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def bases(default_gguf, tmp_path_factory):
    from tests.helpers.tiny_models import tiny_llama_gguf

    d = tmp_path_factory.mktemp("bases")
    tied = tiny_llama_gguf(d / "tied.gguf", default_gguf)
    return {"tied": tied, "untied": untied_copy(tied, d / "untied.gguf")}


@pytest.fixture(scope="module")
def twins(bases):
    """One torch twin per base, copied for each adapter (PEFT edits the model in place)."""
    import copy

    built = {k: hf_twin(v) for k, v in bases.items()}
    return lambda kind: copy.deepcopy(built[kind])


@pytest.fixture(scope="module")
def engines(bases):
    from edge_tune.llama.engine import Engine

    engs = {k: Engine(v, n_ctx=64, logits_all=True, exact=True) for k, v in bases.items()}
    yield engs
    for e in engs.values():
        e.close()


def llama_logits(engine, adapter=None):
    engine.activate(None)
    if adapter is None:
        return engine.logits(TOKENS)
    engine.activate(engine.add_adapter(adapter, str(adapter)))
    try:
        return engine.logits(TOKENS)
    finally:
        engine.activate(None)


def export(peft_dir, base, tmp_path, merge=False):
    from edge_tune import api

    out = tmp_path / ("merged.gguf" if merge else "adapter.gguf")
    api.export(peft_dir, base=base, out=out, merge=merge, quant="F32" if merge else None)
    return out


# (id, base, PEFT LoraConfig kwargs, what to do to the saved config afterwards)
GGUF_SHAPES = [
    ("plain", "tied", dict(target_modules=ALL7), None),
    ("rslora", "tied", dict(target_modules=ALL7, use_rslora=True, r=8), None),
    ("rank_alpha_pattern", "tied", dict(target_modules=ALL7, r=4, lora_alpha=8,
                                        rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 8},
                                        alpha_pattern={"^model.layers.0.mlp.up_proj": 32,
                                                       "k_proj": 3}), None),
    ("target_regex", "tied", dict(target_modules=r".*\.layers\.1\.(self_attn\.(q|v)_proj|mlp\.(gate|down)_proj)"),
     None),
    ("layers_to_transform", "tied", dict(target_modules=ALL7, layers_to_transform=[1],
                                         layers_pattern="layers"), None),
    ("fan_in_fan_out", "tied", dict(target_modules=["q_proj", "down_proj"],
                                    fan_in_fan_out=True), None),
    ("embedding_untied", "untied", dict(target_modules=["embed_tokens", "q_proj"]), None),
    ("lm_head_untied", "untied", dict(target_modules=["lm_head", "v_proj"]), None),
    ("unsloth_bnb4bit_base", "tied", dict(target_modules=ALL7, r=16, lora_alpha=16),
     {"base_model_name_or_path": "unsloth/SmolLM2-135M-Instruct-bnb-4bit",
      "revision": None, "task_type": "CAUSAL_LM"}),
]


@pytest.mark.parametrize("case,base_kind,kw,cfg_edit", GGUF_SHAPES, ids=[c[0] for c in GGUF_SHAPES])
def test_gguf_adapter_matches_peft(case, base_kind, kw, cfg_edit, bases, engines, twins, tmp_path):
    model = twins(base_kind)
    tuned, base = peft_adapter(model, tmp_path / "peft", **kw)
    want = tuned - base
    assert np.linalg.norm(want) > 0.5  # the adapter really changes the logits
    if cfg_edit:
        cfg_path = tmp_path / "peft" / "adapter_config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **cfg_edit}))
    out = export(tmp_path / "peft", bases[base_kind], tmp_path)
    eng = engines[base_kind]
    got = llama_logits(eng, out) - llama_logits(eng)
    err = rel(got, want)
    RESULTS[f"gguf/{case}"] = err
    print(f"{case}: adapter effect error {err:.2e}")
    assert err <= 0.02


# Shapes with no GGUF LoRA form that llama.cpp computes like PEFT: refused, then merged.
MERGE_SHAPES = [
    ("embedding_on_tied", "tied", dict(target_modules=["embed_tokens", "q_proj"]), "tied"),
    ("embedding_on_tied_weight_tying", "tied",
     dict(target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True), "tied"),
    ("lm_head_on_tied", "tied", dict(target_modules=["lm_head", "o_proj"]), "tied"),
    ("modules_to_save_tied", "tied", dict(target_modules=["q_proj"],
                                          modules_to_save=["embed_tokens", "lm_head"]),
     "modules_to_save"),
    ("modules_to_save_embed_tied", "tied", dict(target_modules=["v_proj"],
                                                modules_to_save=["embed_tokens"]),
     "modules_to_save"),
    ("modules_to_save_untied", "untied", dict(target_modules=["q_proj"],
                                              modules_to_save=["lm_head"]), "modules_to_save"),
    ("lora_bias", "tied", dict(target_modules=["q_proj", "k_proj", "down_proj"],
                               lora_bias=True), "lora_bias"),
    ("dora", "tied", dict(target_modules=ALL7, use_dora=True), "DoRA"),
]


@pytest.mark.parametrize("case,base_kind,kw,refusal", MERGE_SHAPES, ids=[c[0] for c in MERGE_SHAPES])
def test_refused_as_gguf_and_merge_matches_peft(case, base_kind, kw, refusal, bases, engines,
                                                twins, tmp_path):
    model = twins(base_kind)
    tuned, base = peft_adapter(model, tmp_path / "peft", **kw)
    assert np.linalg.norm(tuned - base) > 0.5
    with pytest.raises(EdgeTuneError) as info:
        export(tmp_path / "peft", bases[base_kind], tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and refusal in msg and MERGE in msg, msg
    assert not (tmp_path / "adapter.gguf").exists()
    merged = export(tmp_path / "peft", bases[base_kind], tmp_path, merge=True)
    from edge_tune.llama.engine import Engine

    with Engine(merged, n_ctx=64, logits_all=True, exact=True) as eng:
        got = eng.logits(TOKENS)
    llama_base = llama_logits(engines[base_kind])
    err, effect = rel(got, tuned), rel(got - llama_base, tuned - base)
    RESULTS[f"merge/{case}"] = err
    print(f"{case}: merged logits error {err:.2e}, adapter effect error {effect:.2e}")
    assert err <= 1e-3
    assert effect <= 0.02


def test_merge_of_gguf_shapes_matches_peft(bases, engines, twins, tmp_path):
    """--merge of an adapter that also has a GGUF form (embedding LoRA on an untied base)."""
    from edge_tune.llama.engine import Engine

    model = twins("untied")
    tuned, _ = peft_adapter(model, tmp_path / "peft", target_modules=["embed_tokens", *ALL7],
                            use_rslora=True)
    merged = export(tmp_path / "peft", bases["untied"], tmp_path, merge=True)
    with Engine(merged, n_ctx=64, logits_all=True, exact=True) as eng:
        err = rel(eng.logits(TOKENS), tuned)
    RESULTS["merge/embedding_untied_rslora"] = err
    print(f"embedding+projections rsLoRA on untied, merged: logits error {err:.2e}")
    assert err <= 1e-3


def test_print_results():
    for k, v in sorted(RESULTS.items()):
        print(f"{k}: {v:.2e}")


def test_parity_catches_a_merge_that_keeps_the_tie(bases, engines, twins, tmp_path,
                                                   monkeypatch):
    """The untying is needed: a merge that adds the embedding delta to the shared tensor (what
    `merge_and_unload()` does to a tied HF model) moves the output layer too."""
    from edge_tune.converters.formats import merge as merge_mod
    from edge_tune.llama.engine import Engine

    tuned, base = peft_adapter(twins("tied"), tmp_path / "peft",
                               target_modules=["embed_tokens", "q_proj"])
    real_plan = merge_mod.plan

    def keep_tie(*a, **k):
        p = real_plan(*a, **k)
        p.untie = False
        return p

    monkeypatch.setattr(merge_mod, "plan", keep_tie)
    merged = export(tmp_path / "peft", bases["tied"], tmp_path, merge=True)
    with Engine(merged, n_ctx=64, logits_all=True, exact=True) as eng:
        got = eng.logits(TOKENS)
    effect = rel(got - llama_logits(engines["tied"]), tuned - base)
    top1 = float(np.mean(got.argmax(-1) == tuned.argmax(-1)))
    print(f"merge keeping the tie: adapter effect {effect:.0%} off, top-1 {top1:.0%}")
    assert effect > 0.2


@pytest.mark.parametrize("kw,needle", [
    (dict(target_modules=["embed_tokens", "q_proj"]), "token_embd.weight"),
    (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
], ids=["embedding-on-tied", "modules_to_save"])
def test_issue_cases_through_the_cli(kw, needle, bases, twins, tmp_path):
    """As the issue tried them: `export` refuses in one line naming --merge (nothing written);
    `export --merge` then works; `chat` on the merged model answers."""
    from tests.helpers.cli import assert_one_line_error, run_cli

    peft_adapter(twins("tied"), tmp_path / "peft", **kw)
    base = str(bases["tied"])
    proc = run_cli("export", str(tmp_path / "peft"), "--base", base, "-o",
                   str(tmp_path / "a.gguf"), timeout=300)
    assert_one_line_error(proc, needle, MERGE)
    assert not (tmp_path / "a.gguf").exists()
    proc = run_cli("export", str(tmp_path / "peft"), "--base", base, "--merge", "-o",
                   str(tmp_path / "m.gguf"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("chat", "--base", str(tmp_path / "m.gguf"), "--prompt", "hi",
                   "--max-tokens", "2", "--temperature", "0", timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
