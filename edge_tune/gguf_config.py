"""The HF config of a GGUF model, as llama.cpp computes with it (what transformers' loader misses).

transformers rebuilds a config from GGUF metadata through a fixed key map per architecture
(``transformers.integrations.ggml.GGUF_CONFIG_MAPPING``) and takes its own defaults for the
rest. llama.cpp computes with more than that map carries, so the dequantized model that torch
(and mlx) train on could differ from the model llama.cpp runs. Each fix below is a field whose
transformers value differs from llama.cpp's, checked by logit parity on tiny models of each
family (tests/integration/test_family_parity.py):

* ``head_dim`` from ``{arch}.attention.key_length``: transformers assumes hidden / heads, which
  is wrong for e.g. Qwen3-0.6B/4B (loading fails: the weights do not fit).
* Llama-3.1/3.2 RoPE scaling: the converter stores it as per-frequency divisors,
  ``rope_freqs.weight``; transformers ignores the tensor. It is turned back into
  ``rope_type: llama3`` (factor, low/high frequency factors, original context), solved from
  the divisors and accepted only if those parameters reproduce them exactly.
* ``{arch}.rope.scaling.type`` linear / yarn with its factor and original context.
* Gemma 2: attention and final logit soft-capping (transformers keeps its 50 / 30);
  ``query_pre_attn_scalar``: llama.cpp scales queries by 1/sqrt(head_dim), or
  1/sqrt(hidden / heads) for the 27B model (46 blocks).
* Gemma 3: the sliding layers' RoPE base ``rope.freq_base_swa``; RoPE scaling on the global
  layers only; ``query_pre_attn_scalar`` as Gemma 2 (27B: 62 blocks); final soft-capping.
* Phi-3: ``sliding_window`` (0 means none) and LongRoPE factors (``rope_factors_long/short``).
* Mistral (a GGUF named "mistral" loads as transformers' Mistral): no sliding window, as
  llama.cpp runs it with its llama architecture.

Configs are transformers 5 dicts: RoPE lives in ``rope_parameters`` (per layer type for
Gemma 3). Pure functions over plain values, plus :func:`read_gguf_metadata` and
:func:`check_llama_cpp_computes_as_hf` (which read files).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

SMALL_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
# Block counts at which llama.cpp scales queries by 1/sqrt(hidden/heads) instead of
# 1/sqrt(head_dim) (Gemma 2 27B, Gemma 3 27B).
HIDDEN_OVER_HEADS_SCALE = {"gemma2": 46, "gemma3": 62}


def read_gguf_metadata(path: Path) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """(key -> value for every metadata field but the token lists, small tensors by name:
    the RoPE factor tensors in :data:`SMALL_TENSORS` as float lists). Reads the header only."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in reader.fields.items()
          if not k.startswith(("tokenizer.ggml.", "GGUF."))}
    small = {t.name: [float(x) for x in np.asarray(t.data, dtype=np.float32).ravel()]
             for t in reader.tensors if t.name in SMALL_TENSORS}
    return kv, small


def llama3_divisors(factor: float, low: float, high: float, context: int, rope_theta: float,
                    head_dim: int) -> list[float]:
    """Per-frequency RoPE divisors (``head_dim // 2`` floats, frequency i has wavelength
    2π·theta^(2i/head_dim) positions) of transformers' ``rope_type: llama3`` with these
    parameters: 1 below wavelength ``context / high``, ``factor`` above ``context / low``,
    1 / ((1 - s) / factor + s) between, with s = (context / wavelength - low) / (high - low).
    The same formula as llama.cpp's converter (``rope_freqs``) and transformers'
    ``_compute_llama3_parameters``. Pure."""
    out = []
    for i in range(head_dim // 2):
        wavelen = 2 * math.pi * rope_theta ** (2 * i / head_dim)
        if wavelen < context / high:
            out.append(1.0)
        elif wavelen > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def _ramp_lines(x: list[float], ramp: list[float]) -> list[tuple[float, float]]:
    """Candidate (alpha, beta) with ramp ≈ alpha·x - beta: the least-squares line through the
    frequencies strictly inside the ramp, and lines through the transition points (where the
    ramp leaves 0 and reaches 1) for when fewer than two frequencies lie inside it."""
    inside = [(xi, si) for xi, si in zip(x, ramp) if 1e-6 < si < 1 - 1e-6]
    at_factor = [xi for xi, si in zip(x, ramp) if si <= 1e-6]
    at_one = [xi for xi, si in zip(x, ramp) if si >= 1 - 1e-6]
    points = []
    if len(inside) >= 2:
        n = len(inside)
        mx = sum(p[0] for p in inside) / n
        my = sum(p[1] for p in inside) / n
        sxx = sum((p[0] - mx) ** 2 for p in inside)
        if sxx > 0:
            alpha = sum((p[0] - mx) * (p[1] - my) for p in inside) / sxx
            points.append(((mx, my), (mx + 1.0, my + alpha)))
    last_factor = (max(at_factor), 0.0) if at_factor else None
    first_one = (min(at_one), 1.0) if at_one else ((2 * max(x), 1.0) if x else None)
    anchors = [p for p in (last_factor, first_one) if p is not None] + inside[:1]
    points += [(a, b) for i, a in enumerate(anchors) for b in anchors[i + 1:]]
    lines = []
    for (x0, s0), (x1, s1) in points:
        if x1 != x0 and (alpha := (s1 - s0) / (x1 - x0)) > 0:
            lines.append((alpha, alpha * x0 - s0))
    return lines


def llama3_scaling(divisors: list[float], rope_theta: float, head_dim: int,
                   context: int | None = None) -> dict | None:
    """The ``llama3`` RoPE scaling parameters (transformers' ``rope_parameters``) that give
    these per-frequency divisors (llama.cpp's ``rope_freqs``, see :func:`llama3_divisors`) to
    a relative 1e-5, or None if no llama3 parameters do. Pure.

    Solved, not guessed: ``factor`` is the largest divisor; in the ramp, 1/divisor =
    (1 - s)/factor + s with s = alpha/wavelength - beta, alpha = context/(high - low) and
    beta = low/(high - low): a line in 1/wavelength, fitted by least squares over the
    frequencies inside the ramp (or through the transition points when fewer than two lie
    inside). Only alpha and beta are determined: every (context, low, high) with the same
    alpha and beta gives identical divisors, so ``context`` is the caller's (the GGUF's
    original context length, else :func:`fix_config` takes max_position_embeddings / factor
    for models of at most 8192 positions), else 8192 (Llama 3.x's); low/high follow from it.
    """
    factor = max(divisors)
    context = int(context or 8192)
    if factor <= 1.0:
        return {"rope_type": "llama3", "factor": 1.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": context}
    x = [1 / (2 * math.pi * rope_theta ** (2 * i / head_dim)) for i in range(len(divisors))]
    ramp = [(1 / d - 1 / factor) / (1 - 1 / factor) for d in divisors]
    # Llama 3.x's own low/high first: a coarsely sampled ramp fits them among others
    for alpha, beta in [(context / 3, 1 / 3)] + _ramp_lines(x, ramp):
        low, high = beta * context / alpha, (1 + beta) * context / alpha
        # 6 significant digits recover the published values (1, 4) when they reproduce
        for f, lo, hi in ((float(f"{factor:.6g}"), float(f"{low:.6g}"), float(f"{high:.6g}")),
                          (factor, low, high)):
            if lo <= 0 or hi <= lo:
                continue
            want = llama3_divisors(f, lo, hi, context, rope_theta, head_dim)
            if all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(want, divisors)):
                return {"rope_type": "llama3", "factor": f, "low_freq_factor": lo,
                        "high_freq_factor": hi, "original_max_position_embeddings": context}
    return None


def query_scale_problem(config: dict) -> str | None:
    """Why llama.cpp would scale a Gemma 2 model's queries differently from transformers, or
    None. ``config``: an HF ``config.json`` dict. transformers scales queries by
    1/sqrt(``query_pre_attn_scalar``); llama.cpp's gemma2 graph by 1/sqrt(head_dim), or
    1/sqrt(hidden_size / num_attention_heads) at 46 blocks (its 27B type; llama.cpp
    src/llama-model.cpp ``f_attention_scale``), and its converter writes no key for another
    value. Real Gemma 2 checkpoints agree; a custom config may not. Pure."""
    if config.get("model_type") != "gemma2":
        return None
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if not hidden or not heads:
        return None
    head_dim = config.get("head_dim") or hidden // heads
    scalar = config.get("query_pre_attn_scalar", 256)  # transformers' Gemma2Config default
    if config.get("num_hidden_layers") == HIDDEN_OVER_HEADS_SCALE["gemma2"]:
        used, why = hidden // heads, f"hidden_size/num_attention_heads ({hidden // heads})"
    else:
        used, why = head_dim, f"head_dim ({head_dim})"
    if scalar == used:
        return None
    return (f"query_pre_attn_scalar: {scalar:g} is not what llama.cpp's gemma2 graph scales "
            f"queries by (1/sqrt of {why}; a GGUF has no key for another value), so the GGUF "
            f"would compute differently from this model (expected {used})")


def check_llama_cpp_computes_as_hf(hf_dir: Path) -> None:
    """Raise EdgeTuneError when llama.cpp would run the converted GGUF differently from the HF
    model in ``hf_dir`` (:func:`query_scale_problem` on its ``config.json``; an unreadable one
    is left to the converter's own checks)."""
    import json

    from edge_tune.errors import Unsupported

    try:
        config = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError):
        return  # the converter's own checks say what is wrong with it
    if problem := query_scale_problem(config.get("text_config") or config):
        raise Unsupported(f"{hf_dir / 'config.json'}: {problem}")


def _scaling(kv: dict, arch: str) -> dict:
    """``{arch}.rope.scaling.*`` as transformers' rope parameters ({} when none)."""
    kind = kv.get(f"{arch}.rope.scaling.type")
    factor = kv.get(f"{arch}.rope.scaling.factor")
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn" and factor:
        out = {"rope_type": "yarn", "factor": float(factor)}
        ctx = kv.get(f"{arch}.rope.scaling.original_context_length")
        if ctx:
            out["original_max_position_embeddings"] = int(ctx)
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                          ("yarn_ext_factor", "extrapolation_factor")):
            if (v := kv.get(f"{arch}.rope.scaling.{key}")) is not None:
                out[name] = float(v)
        return out
    return {}


class UnsupportedRope(ValueError):
    """The GGUF's RoPE factors match no scaling transformers can express."""


def fix_config(config: dict, kv: dict, small: dict[str, list[float]]) -> dict:
    """``config`` (transformers' own parse of the GGUF, ``to_dict()`` form) with the fields
    llama.cpp computes differently set as llama.cpp does. Returns a new dict. Raises
    :class:`UnsupportedRope` for RoPE factors transformers cannot express. Pure."""
    cfg = dict(config)
    arch = kv.get("general.architecture", "")
    n_layer = int(kv.get(f"{arch}.block_count", cfg.get("num_hidden_layers", 0)))
    hidden = cfg.get("hidden_size")
    heads = cfg.get("num_attention_heads")
    if (key_length := kv.get(f"{arch}.attention.key_length")) is not None:
        cfg["head_dim"] = int(key_length)
    head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else None)
    rope = dict(cfg.get("rope_parameters") or {})

    if arch == "gemma3":
        _gemma3_rope(cfg, kv, arch, rope, n_layer)
    elif rope or kv.get(f"{arch}.rope.freq_base") is not None:
        _rope(cfg, kv, arch, rope, small, head_dim)

    if arch in ("gemma2", "gemma3") and head_dim:
        scale_by_width = n_layer == HIDDEN_OVER_HEADS_SCALE[arch]
        cfg["query_pre_attn_scalar"] = hidden // heads if scale_by_width else head_dim
    if arch == "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if (v := kv.get(f"{arch}.{key}")) is not None:
                cfg[key] = float(v)
    if arch == "phi3" and (window := kv.get(f"{arch}.attention.sliding_window")) is not None:
        cfg["sliding_window"] = int(window) or None
    if cfg.get("model_type") == "mistral":  # llama.cpp runs Mistral as "llama": no window
        cfg["sliding_window"] = None
    return cfg


def _gemma3_rope(cfg: dict, kv: dict, arch: str, rope: dict, n_layer: int) -> None:
    """Gemma 3's RoPE as llama.cpp runs it, into ``cfg``: the global layers' base and scaling,
    the sliding layers' own base, every 6th block global, and the final soft-cap."""
    full = dict(rope.get("full_attention") or {"rope_type": "default"})
    local = dict(rope.get("sliding_attention") or {"rope_type": "default"})
    if (base := kv.get(f"{arch}.rope.freq_base")) is not None:
        full["rope_theta"] = float(base)
    # llama.cpp's default for the sliding layers when the GGUF does not say
    local["rope_theta"] = float(kv.get(f"{arch}.rope.freq_base_swa", 10000.0))
    full.update(_scaling(kv, arch))
    cfg["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
    # llama.cpp's fixed pattern: every 6th block is global
    cfg["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                          for i in range(n_layer)]
    cfg["final_logit_softcapping"] = kv.get(f"{arch}.final_logit_softcapping")


def _rope(cfg: dict, kv: dict, arch: str, rope: dict, small: dict[str, list[float]],
          head_dim) -> None:
    """RoPE as llama.cpp runs it, into ``cfg``: its base, linear/yarn scaling, Llama-3.1's
    per-frequency divisors (``rope_freqs.weight``) solved back into ``rope_type: llama3``,
    and Phi-3's LongRoPE factors. Raises :class:`UnsupportedRope` for divisors that follow
    no llama3 curve."""
    if (base := kv.get(f"{arch}.rope.freq_base")) is not None:
        rope["rope_theta"] = float(base)
    rope.update(_scaling(kv, arch))
    if "rope_freqs.weight" in small:
        divisors = small["rope_freqs.weight"]
        context = kv.get(f"{arch}.rope.scaling.original_context_length")
        longest = cfg.get("max_position_embeddings")
        if context is None and longest and longest <= 8192:
            # transformers warns unless the original context is below the model's
            context = max(1, int(longest // max(divisors)))
        found = llama3_scaling(divisors, rope.get("rope_theta", 10000.0), head_dim, context)
        if found is None:
            raise UnsupportedRope(
                "rope_freqs.weight: per-frequency RoPE divisors that follow no llama3 curve "
                "(1 at high frequencies, one factor at low frequencies, a 1/wavelength ramp "
                "between), the only per-frequency scaling edge-tune can turn into a "
                "transformers config")
        if found["factor"] != 1.0:
            rope.update(found)
    if "rope_factors_long.weight" in small:  # Phi-3 LongRoPE
        rope.update({"rope_type": "longrope",
                     "long_factor": small["rope_factors_long.weight"],
                     "short_factor": small.get("rope_factors_short.weight",
                                               small["rope_factors_long.weight"])})
        if (ctx := kv.get(f"{arch}.rope.scaling.original_context_length")) is not None:
            cfg["original_max_position_embeddings"] = int(ctx)
    cfg["rope_parameters"] = rope


# Bumped whenever fix_config changes what it writes: cached dequantized copies made with an
# older version get their config.json rewritten (the weights do not depend on it).
CONFIG_FIXES = 2


def hf_config(gguf_path: Path):
    """transformers' config for ``gguf_path`` with :func:`fix_config` applied (a
    ``PretrainedConfig``; pass it as ``config=`` when loading the GGUF). Raises
    EdgeTuneError for RoPE factors transformers cannot express."""
    from transformers import AutoConfig

    from edge_tune.errors import Unsupported

    gguf_path = Path(gguf_path)
    base = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    kv, small = read_gguf_metadata(gguf_path)
    try:
        fixed = fix_config(base.to_dict(), kv, small)
    except UnsupportedRope as exc:
        raise Unsupported(f"{gguf_path}: {exc} (so it cannot be trained as llama.cpp runs "
                          "it)") from None
    return type(base).from_dict(fixed)


def refresh_cached_config(hf_dir: Path, gguf_path: Path) -> None:
    """Rewrite ``hf_dir/config.json`` (a dequantized copy of ``gguf_path``) if it was made
    before the current :data:`CONFIG_FIXES`; atomically."""
    import json

    from edge_tune.fsutil import atomic_path

    source_path = Path(hf_dir) / "edge_tune_source.json"
    try:
        source = json.loads(source_path.read_text())
    except (OSError, ValueError):
        source = {}
    if source.get("config_fixes") == CONFIG_FIXES or not Path(gguf_path).is_file():
        return
    old = json.loads((Path(hf_dir) / "config.json").read_text())
    new = hf_config(gguf_path).to_dict()
    new.pop("quantization_config", None)
    new["architectures"] = old.get("architectures")
    new["torch_dtype"] = old.get("torch_dtype", "float32")
    with atomic_path(Path(hf_dir) / "config.json") as tmp:
        tmp.write_text(json.dumps(new, indent=2))
    with atomic_path(source_path) as tmp:
        tmp.write_text(json.dumps({**source, "config_fixes": CONFIG_FIXES}, indent=2))
