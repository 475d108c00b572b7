"""DPO and ORPO on the mlx backend (``edge_tune.training.backends.mlx_preference``), on mlx's Linux CPU
build with a tiny random Llama (hidden 64, 2 blocks, SmolLM2's tokenizer and template).

Parity: the same tiny HF model and the same LoRA weights (an mlx adapter with random non-zero
B, converted to PEFT with the project's ``mlx_to_peft``) in mlx and in torch + PEFT, float32;
the mlx losses and rewards equal the CPU backend's (``preference_loss.pair_loss``) on the same
batch of pairs. Then a short mlx DPO run trains, exports and verifies like an SFT run.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import numpy as np
import pytest


pytest.importorskip("mlx_lm")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# float32 end to end; the two frameworks sum ~100 token log-probabilities in different orders
LOSS_RTOL = 1e-5
REWARD_ATOL = 1e-4


def _asset(name: str) -> Path:
    return Path(str(resources.files("edge_tune") / "assets" / name))


@pytest.fixture(scope="module")
def pairs(tiny_hf):
    """Four tokenized pairs of the bundled preference set, as the worker makes them."""
    from transformers import AutoTokenizer

    from edge_tune.data.formats import read_records
    from edge_tune.data.preference import encode_pair

    tok = AutoTokenizer.from_pretrained(str(tiny_hf))
    records = read_records(_asset("pref_demo.jsonl")).records[:4]
    return [encode_pair(tok, r.messages, r.rejected) for r in records]


@pytest.fixture(scope="module", params=["lora", "dora"])
def both(request, tiny_hf, tmp_path_factory):
    """(mlx model with a random non-zero LoRA or DoRA adapter, the same model in torch +
    PEFT). DoRA's magnitudes are moved too: its layers with B = 0 or scale 0 are then not the
    base, so only switching the adapter off gives the reference."""
    import mlx.core as mx
    import torch
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edge_tune.training.backends.mlx_config import mlx_load_kwargs
    from edge_tune.training.backends.mlx import lora_keys, mlx_lora_config
    from edge_tune.converters.formats import mlx_to_peft

    model, _ = load(str(tiny_hf), **mlx_load_kwargs(tiny_hf))
    model.freeze()
    keys = lora_keys([n for n, _ in model.layers[0].named_modules() if n], TARGETS)
    dora = request.param == "dora"
    native = mlx_lora_config(4, 8.0, keys, len(model.layers), str(tiny_hf), dora=dora)
    linear_to_lora_layers(model, len(model.layers), native["lora_parameters"], use_dora=dora)
    mx.random.seed(1)
    moved = [(k, mx.random.normal(v.shape) * 0.05)  # B = 0 would make DPO trivial
             for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]
    moved += [(k, v * (1 + 0.1 * mx.random.normal(v.shape)))  # DoRA's magnitudes
              for k, v in tree_flatten(model.trainable_parameters()) if k.endswith(".m")]
    model.update(tree_unflatten(moved))
    model.eval()
    mlx_dir, peft_dir = (tmp_path_factory.mktemp(n) for n in ("mlx", "peft"))
    mx.save_safetensors(str(mlx_dir / mlx_to_peft.WEIGHTS),
                        dict(tree_flatten(model.trainable_parameters())))
    (mlx_dir / mlx_to_peft.CONFIG).write_text(json.dumps(native))
    mlx_to_peft.convert(mlx_dir, peft_dir, base_model=str(tiny_hf))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_hf), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(peft_dir)).eval()
    return model, peft_model


@pytest.mark.parametrize("method, beta", [("dpo", 0.1), ("orpo", 0.2)])
def test_mlx_preference_loss_equals_the_cpu_backends(both, pairs, method, beta):
    import mlx.core as mx
    import torch

    from edge_tune.training.backends import mlx_preference
    from edge_tune.training.backends.cpu import pair_rows
    from edge_tune.training.preference_loss import pair_loss

    model, peft_model = both
    tokens, mask = (mx.array(a) for a in mlx_preference.pair_arrays(pairs, 0, 128))
    got = mlx_preference.pair_loss(model, tokens, mask, method, beta)
    with torch.no_grad():
        want = pair_loss(peft_model, *pair_rows(pairs, 0), method, beta)
    print(f"{method}: mlx {float(got.loss):.7f} cpu {float(want.loss):.7f}")
    if method == "dpo":  # the adapter moved the policy away from its reference
        assert abs(float(want.loss) - math.log(2)) > 1e-3
    assert float(got.loss) == pytest.approx(float(want.loss), rel=LOSS_RTOL)
    for side in ("chosen_rewards", "rejected_rewards"):
        np.testing.assert_allclose(np.array(getattr(got, side)),
                                   getattr(want, side).numpy(), atol=REWARD_ATOL)
    assert got.stats() == pytest.approx(want.stats(), abs=REWARD_ATOL)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (2.0, 0.5)])
def test_mlx_kto_loss_equals_the_cpu_backends(both, tiny_hf, weights):
    """KTO (``--method kto``): the CPU backend's loss is TRL's ``KTOTrainer``'s
    (test_unsloth_mapping_kto.py); mlx's equals it on the same weights, examples and KL
    rows."""
    import mlx.core as mx
    import torch
    from transformers import AutoTokenizer

    from edge_tune.config import TrainConfig
    from edge_tune.data.formats import read_records
    from edge_tune.data.preference import encode_kto
    from edge_tune.training.backends import mlx_preference
    from edge_tune.training.backends.cpu import pair_rows
    from edge_tune.training.preference_loss import kto_terms, pair_loss

    tok = AutoTokenizer.from_pretrained(str(tiny_hf))
    records = read_records(_asset("pref_demo.jsonl")).records[:4]
    batch = [encode_kto(tok, r.messages if i % 2 else r.rejected, bool(i % 2))
             for i, r in enumerate(records)]
    cfg = TrainConfig(data="x", method="kto", desirable_weight=weights[0],
                      undesirable_weight=weights[1])
    model, peft_model = both
    tokens, mask = (mx.array(a) for a in mlx_preference.pair_arrays(batch, 0, 128))
    got = mlx_preference.pair_loss(model, tokens, mask, "kto", 0.1,
                                   kto=mlx_preference.kto_terms(batch, cfg))
    with torch.no_grad():
        want = pair_loss(peft_model, *pair_rows(batch, 0, 128), "kto", 0.1,
                         kto_terms(batch, cfg))
    assert abs(float(want.loss) - 0.5) > 1e-3  # the adapter moved the policy
    assert float(got.loss) == pytest.approx(float(want.loss), rel=LOSS_RTOL)
    assert got.stats() == pytest.approx(want.stats(), abs=REWARD_ATOL)


def test_adapter_off_computes_the_base_and_puts_the_adapter_back(both, pairs, tiny_hf):
    import mlx.core as mx
    from mlx_lm import load

    from edge_tune.training.backends import mlx_preference
    from edge_tune.training.backends.mlx_config import mlx_load_kwargs

    model, _ = both
    tokens, _ = mlx_preference.pair_arrays(pairs[:1], 0, 128)
    tokens = mx.array(tokens)
    tuned = np.array(model(tokens))
    with mlx_preference.adapter_off(model):
        off = np.array(model(tokens))
    base, _ = load(str(tiny_hf), **mlx_load_kwargs(tiny_hf))
    np.testing.assert_allclose(off, np.array(base(tokens)), atol=1e-5)
    assert np.abs(tuned - off).max() > 1e-2
    np.testing.assert_array_equal(np.array(model(tokens)), tuned)  # the adapter is back


@pytest.mark.slow
def test_tiny_mlx_dpo_trains_exports_and_verifies(tiny, tmp_path):
    from edge_tune import api
    from edge_tune.config import build
    from edge_tune.events import Log, Metric

    metrics, logs = [], []
    out = tmp_path / "run"
    cfg = build(None, data=str(_asset("pref_demo.jsonl")), out=str(out), model=str(tiny),
                max_steps=6, batch_size=2, seq_len=64, lr=2e-3, rank=4, alpha=8, seed=3,
                val_split=0.05, backend="mlx", report_to="none", method="dpo")
    api.train(cfg, lambda e: metrics.append(e) if isinstance(e, Metric) else
              logs.append(e.message) if isinstance(e, Log) else None)
    train = [m for m in metrics if m.split == "train"]
    val = [m for m in metrics if m.split == "val"]
    assert len(train) == 6 and val
    # the adapter starts as the reference (LoRA B = 0): loss log 2, margin 0
    assert train[0].loss == pytest.approx(math.log(2), abs=1e-4)
    assert train[0].reward_margin == pytest.approx(0, abs=1e-4)
    assert train[-1].loss < train[0].loss and val[-1].reward_margin > 0
    assert val[-1].reward_accuracy is not None
    man = json.loads((out / "manifest.json").read_text())
    assert man["backend"] == "mlx" and man["data"]["format"] == "preference"
    assert man["hyperparameters"]["method"] == "dpo"
    for name in ("mlx/adapters.safetensors", "adapter/adapter_model.safetensors",
                 "adapter.gguf"):
        assert (out / name).is_file(), name
    # train's own check: llama.cpp computes what mlx trained
    assert any(line.startswith("verify:") and line.endswith("(ok)") for line in logs), logs


@pytest.mark.slow
def test_tiny_mlx_kto_trains_exports_and_verifies(tiny, tmp_path):
    """``--method kto`` on mlx: unpaired answers of the bundled set (pirate ones good, plain
    ones bad, never both for one prompt), trained, exported and verified like DPO."""
    from edge_tune import api
    from edge_tune.config import build
    from edge_tune.events import Log, Metric

    pairs = [json.loads(line) for line in _asset("pref_demo.jsonl").read_text().splitlines()]
    data = tmp_path / "thumbs.jsonl"
    data.write_text("".join(json.dumps(
        {"prompt": p["prompt"], "completion": p["chosen" if i % 2 == 0 else "rejected"],
         "label": i % 2 == 0}) + "\n" for i, p in enumerate(pairs[:24])))
    metrics, logs = [], []
    out = tmp_path / "run"
    cfg = build(None, data=str(data), out=str(out), model=str(tiny), max_steps=6,
                batch_size=4, seq_len=64, lr=5e-3, rank=4, alpha=8, seed=3, val_split=0.15,
                backend="mlx", report_to="none", method="kto")
    api.train(cfg, lambda e: metrics.append(e) if isinstance(e, Metric) else
              logs.append(e.message) if isinstance(e, Log) else None)
    train = [m for m in metrics if m.split == "train"]
    assert len(train) == 6 and train[0].loss == pytest.approx(0.5, abs=1e-4)  # 1 − σ(0)
    assert train[-1].reward_margin > 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["hyperparameters"]["method"] == "kto" and man["backend"] == "mlx"
    assert (out / "adapter.gguf").is_file()
    assert any(line.startswith("verify:") and line.endswith("(ok)") for line in logs), logs
