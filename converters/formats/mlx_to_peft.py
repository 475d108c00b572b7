"""mlx-lm LoRA adapter -> PEFT LoRA adapter (from which ``peft_to_gguf`` writes the GGUF).

An mlx-lm adapter directory holds ``adapters.safetensors`` and ``adapter_config.json``
(``fine_tune_type``, ``num_layers``, ``lora_parameters = {rank, scale, dropout, keys?}``).
mlx-lm computes ``y + scale * (x @ lora_a) @ lora_b`` with ``lora_a`` of shape (in, r) and
``lora_b`` (r, out); PEFT computes ``y + (alpha / r) * B (A x)`` with A (r, in), B (out, r). So
A = lora_a.T, B = lora_b.T and alpha = scale * r; a DoRA adapter's ``.m`` is PEFT's
``lora_magnitude_vector`` (both scale rows of W + scale * B A by m / its row norm). DoRA has no
GGUF LoRA form, so it exports merged only (``peft_to_gguf`` says so). Both keep HF module names and HF (unpermuted)
q/k layout, so going through PEFT reuses the one GGUF writer that already handles the Llama
q/k rope permutation and every other naming detail.

``to_peft()`` is pure; ``read_mlx_adapter()`` and ``convert()`` do the I/O.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_tune.errors import DataError, Unsupported

CONFIG = "adapter_config.json"
WEIGHTS = "adapters.safetensors"


def is_mlx_adapter_dir(path: Path) -> bool:
    """An mlx-lm adapter directory (as opposed to a PEFT one, which has the same config name)."""
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        return False
    try:
        cfg = json.loads((path / CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and ("lora_parameters" in cfg or "fine_tune_type" in cfg)


def read_mlx_adapter(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path / CONFIG}: cannot read ({exc})") from None
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (OSError, SafetensorError) as exc:
        raise DataError(f"{path / WEIGHTS}: not a readable safetensors file ({exc})") from None
    return config, tensors


def to_peft(config: dict, tensors: dict[str, np.ndarray], where: str = "mlx adapter",
            base_model: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(PEFT adapter_config, PEFT tensors) for an mlx-lm LoRA adapter. Pure."""
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise DataError(f"{where}: fine_tune_type {kind!r} is not a LoRA adapter "
                        "(expected 'lora' or 'dora')")
    params = config.get("lora_parameters") or {}
    if "scale" not in params:
        raise DataError(f"{where}: {CONFIG} has no lora_parameters.scale (expected the "
                        "mlx-lm LoRA multiplier, e.g. 20.0)")
    scale = float(params["scale"])

    out: dict[str, np.ndarray] = {}
    modules: set[str] = set()
    layers: set[int] = set()
    ranks: set[int] = set()
    for key, arr in tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in ("lora_a", "lora_b", "m") or not module:
            raise DataError(f"{where}: tensor {key!r} is not an mlx-lm LoRA weight "
                            "(expected '<module>.lora_a', '.lora_b' or DoRA's '.m')")
        arr = np.asarray(arr, dtype=np.float32)
        if leaf == "m":  # DoRA's per-output magnitude: the same quantity PEFT stores
            out[f"base_model.model.{module}.lora_magnitude_vector"] = arr
            continue
        if arr.ndim != 2:
            raise Unsupported(f"{where}: tensor {key!r} has shape {arr.shape}; expected a "
                              "matrix (mixture-of-experts LoRA is not supported)")
        if leaf == "lora_a":
            ranks.add(arr.shape[1])
        is_embedding = module.endswith("embed_tokens")
        part = ("lora_embedding_A" if leaf == "lora_a" else "lora_embedding_B") if is_embedding \
            else ("lora_A.weight" if leaf == "lora_a" else "lora_B.weight")
        out[f"base_model.model.{module}.{part}"] = np.ascontiguousarray(arr.T)
        modules.add(module.rsplit(".", 1)[-1])
        parts = module.split(".")
        if "layers" in parts and parts.index("layers") + 1 < len(parts):
            nxt = parts[parts.index("layers") + 1]
            if nxt.isdigit():
                layers.add(int(nxt))
    for key in out:
        twin = key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
        if twin not in out and ("lora_A" in key or "lora_embedding_A" in key):
            raise DataError(f"{where}: {key.split('base_model.model.')[1]} has lora_a but "
                            "no lora_b")
    if not out:
        raise DataError(f"{where}: {WEIGHTS} holds no LoRA tensors")
    if len(ranks) != 1:
        raise DataError(f"{where}: LoRA ranks differ between modules ({sorted(ranks)}); "
                        "expected one rank")
    rank = ranks.pop()
    if params.get("rank") not in (None, rank):
        raise DataError(f"{where}: lora_parameters.rank is {params['rank']} but the "
                        f"tensors have rank {rank}")
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": scale * rank,  # PEFT scales by alpha / r; mlx-lm by `scale` itself
        "lora_dropout": float(params.get("dropout", 0.0)),
        "target_modules": sorted(modules),
        "bias": "none",
        "use_rslora": False,
        "use_dora": kind == "dora" or any(k.endswith("lora_magnitude_vector") for k in out),
        "fan_in_fan_out": False,
        "base_model_name_or_path": base_model or config.get("model"),
        "layers_to_transform": sorted(layers) or None,
    }
    return peft_config, out


def convert(mlx_dir: Path, out_dir: Path, base_model: str | None = None) -> Path:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.numpy import save_file

    from edge_tune.fsutil import atomic_path

    config, tensors = read_mlx_adapter(mlx_dir)
    peft_config, peft_tensors = to_peft(config, tensors, str(mlx_dir), base_model)
    with atomic_path(Path(out_dir)) as tmp:
        tmp.mkdir(parents=True)
        save_file(peft_tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    return Path(out_dir)
