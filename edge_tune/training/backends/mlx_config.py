"""An HF config as mlx-lm needs it: the overrides that make mlx compute the model torch and
llama.cpp compute.

The HF copies edge-tune trains on are written by transformers 5, which keeps RoPE under
``rope_parameters`` (``{"rope_theta", "rope_type", ...}``; per layer type for Gemma 3:
``{"full_attention": {...}, "sliding_attention": {...}}``). mlx-lm 0.32 reads the older
top-level keys (``rope_theta``, ``rope_scaling``, ``rope_local_base_freq``,
``sliding_window_pattern``) and silently falls back to its defaults when they are missing: a
model with RoPE base 100000 ran with 10000 (12 % logit error on the default model). Measured by
tests/integration/test_family_parity.py (torch vs mlx vs llama.cpp on the same tokens).

mlx-lm also leaves out some sliding windows (its gemma2 and phi3 models attend over the whole
sequence), and its LongRoPE (``SuScaledRoPE``, Phi-3-128k, Phi-3.5, Phi-4-mini) always rotates
by ``long_factor``, where transformers takes ``short_factor`` for sequences within
``original_max_position_embeddings`` and llama.cpp ``rope_factors_short`` for contexts within
it: mlx gets the short factors in place of the long ones (:func:`_longrope`), so it is exact up
to that length. :func:`mlx_exact_length` says up to which sequence length mlx computes such a
model exactly. Pure module: dicts in, dicts out.
"""

from __future__ import annotations

from typing import Any


class NotExpressible(ValueError):
    """The config has a feature mlx-lm's model for it cannot express."""


def _scaling(rope: dict) -> dict | None:
    """transformers' rope parameters -> mlx-lm's ``rope_scaling`` (None for plain RoPE). mlx-lm
    reads the kind from "type" (phi3) or "rope_type" (rope_utils): both are set."""
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return None
    out = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    out["type"] = out["rope_type"] = kind
    return out


def _longrope(scaling: dict, hf: dict[str, Any]) -> dict:
    """mlx-lm's ``rope_scaling`` for a LongRoPE model run within its original context: the
    short factors under "long_factor" (the only set ``SuScaledRoPE`` applies). Raises
    :class:`NotExpressible` when transformers' attention factor (cos/sin scale) is not the one
    ``SuScaledRoPE`` derives, sqrt(1 + ln(max/original) / ln(original)). Pure."""
    import math

    longest = hf.get("max_position_embeddings")
    original = hf.get("original_max_position_embeddings") or scaling.get(
        "original_max_position_embeddings")
    if not longest or not original:
        raise NotExpressible("LongRoPE without max_position_embeddings and "
                             "original_max_position_embeddings")
    ratio = longest / original
    theirs = 1.0 if ratio <= 1.0 else math.sqrt(1 + math.log(ratio) / math.log(original))
    factor = scaling.get("factor") or ratio
    ours = scaling.get("attention_factor") or (
        1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original)))
    if not math.isclose(ours, theirs, rel_tol=1e-6):
        raise NotExpressible(f"LongRoPE attention factor {ours:g} (mlx-lm's phi3 scales by "
                             f"{theirs:g}, from the context lengths)")
    return {**scaling, "long_factor": scaling["short_factor"]}


def mlx_model_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The ``model_config`` overrides for ``mlx_lm.load`` for a model whose ``config.json`` is
    ``hf``: RoPE base, scaling, local base and layer pattern at the keys mlx-lm reads. Raises
    :class:`NotExpressible` for a layer pattern mlx-lm's model cannot express. Pure."""
    rope = hf.get("rope_parameters")
    out: dict[str, Any] = {}
    if not isinstance(rope, dict):
        return out
    if "full_attention" in rope or "sliding_attention" in rope:  # per layer type (Gemma 3)
        full = rope.get("full_attention") or {}
        local = rope.get("sliding_attention") or {}
        if "rope_theta" in full:
            out["rope_theta"] = full["rope_theta"]
        if "rope_theta" in local:
            out["rope_local_base_freq"] = local["rope_theta"]
        out["rope_scaling"] = _scaling(full)
        if _scaling(local) is not None:
            raise NotExpressible("RoPE scaling on sliding-window layers (mlx-lm scales the "
                                 "global layers only)")
    else:
        if "rope_theta" in rope:
            out["rope_theta"] = rope["rope_theta"]
        out["rope_scaling"] = _scaling(rope)
        if out["rope_scaling"] and out["rope_scaling"]["type"] in ("longrope", "su"):
            out["rope_scaling"] = _longrope(out["rope_scaling"], hf)
        if "partial_rotary_factor" in rope:
            out["partial_rotary_factor"] = rope["partial_rotary_factor"]
    types = hf.get("layer_types")
    if hf.get("model_type") == "gemma3_text" and types:
        # mlx-lm: block i is global iff (i + 1) % sliding_window_pattern == 0
        fulls = [i for i, t in enumerate(types) if t == "full_attention"]
        pattern = fulls[0] + 1 if fulls else len(types) + 1
        if types != ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                     for i in range(len(types))]:
            raise NotExpressible(f"layer_types {types} are not a fixed sliding:global pattern")
        out["sliding_window_pattern"] = pattern
    return out


def _longrope_context(hf: dict[str, Any]) -> int | None:
    """The original context of a LongRoPE model (where transformers switches from the short
    to the long factors), None for other models. Pure."""
    rope = hf.get("rope_parameters")
    if not isinstance(rope, dict) or (rope.get("rope_type") or rope.get("type")) not in (
            "longrope", "su"):
        return None
    return hf.get("original_max_position_embeddings") or rope.get(
        "original_max_position_embeddings")


def _window(hf: dict[str, Any]) -> int | None:
    """The sliding window mlx-lm leaves out, or None. Pure."""
    kind = hf.get("model_type")
    window = hf.get("sliding_window")
    if window and (kind in ("gemma2", "phi3") or (kind == "qwen2" and hf.get(
            "use_sliding_window"))):
        return int(window)
    return None


def mlx_exact_length(hf: dict[str, Any]) -> int | None:
    """The longest sequence mlx-lm computes this model exactly for, or None for any length:
    mlx-lm's gemma2 and phi3 models (and qwen2's, where ``use_sliding_window`` is set) have no
    sliding window, so past the window they attend further back than torch and llama.cpp; a
    LongRoPE model runs with its short factors, right up to its original context. Pure."""
    limits = [n for n in (_window(hf), _longrope_context(hf)) if n]
    return int(min(limits)) if limits else None


def mlx_load_kwargs(hf_dir, seq_len: int | None = None) -> dict[str, Any]:
    """``mlx_lm.load`` keyword arguments for the HF model in ``hf_dir``:
    ``{"model_config": overrides}``. ``seq_len``: the longest sequence it will see; raises
    EdgeTuneError if mlx-lm cannot compute the model exactly for it (or at all)."""
    import json
    from pathlib import Path

    from edge_tune.errors import Unsupported

    path = Path(hf_dir) / "config.json"
    hf = json.loads(path.read_text())
    try:
        overrides = mlx_model_config(hf)
    except NotExpressible as exc:
        raise Unsupported(f"{path}: mlx-lm cannot run this model: {exc} (use --backend "
                          "cpu)") from None
    limit = mlx_exact_length(hf)
    if seq_len is not None and limit is not None and seq_len > limit:
        why = ("has no sliding window" if limit == _window(hf) else
               "applies one LongRoPE factor set (the short one here)")
        raise Unsupported(f"mlx-lm's {hf.get('model_type')} model {why}, "
                          f"so it is exact only up to {limit} tokens "
                          f"(use --seq-len {limit} or less, or --backend cpu)",
                          setting="seq_len", value=seq_len)
    return {"model_config": overrides}
