"""Hand a PEFT LoRA adapter to vLLM: the adapter directory plus the exact ``vllm serve`` line.

vLLM loads PEFT adapters as they are (``--enable-lora --lora-modules NAME=PATH``); what it reads
from ``adapter_config.json`` is ``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``,
``use_dora`` (refused), ``bias`` (must be "none") and ``modules_to_save``. Its
``--max-lora-rank`` takes only a few values and must be at least the adapter's rank.
The pure parts (rank, config, command) are separate from the one function that writes files.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

from edge_tune.errors import DataError, Unsupported, UsageError

# vLLM's LoRAConfig.max_lora_rank accepts exactly these (its MaxLoRARanks literal).
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def max_lora_rank(r: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds rank ``r``. Pure."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if r <= allowed:
            return allowed
    raise Unsupported(f"LoRA rank {r} is above vLLM's largest --max-lora-rank "
                      f"({VLLM_MAX_LORA_RANKS[-1]}); retrain with a smaller --rank")


def adapter_name(text: str) -> str:
    """A ``--lora-modules`` name: the model name clients send, so no spaces or '='. Pure."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return name or "adapter"


def vllm_config(config: dict, base: str, where: str = CONFIG) -> dict:
    """``config`` (a PEFT adapter_config.json) with what vLLM reads made explicit, pointing at
    ``base``; refuses what vLLM cannot serve. Pure."""
    problems = []
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        problems.append("'r' (the rank) is missing")
    if not config.get("target_modules"):
        problems.append("'target_modules' is missing")
    if config.get("use_dora"):
        problems.append("it is a DoRA adapter (vLLM serves plain LoRA only; export --merge "
                        "instead)")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (vLLM needs 'none')")
    if problems:
        raise Unsupported(f"{where}: cannot serve with vLLM: " + "; ".join(problems))
    out = dict(config)
    out["base_model_name_or_path"] = base
    out["lora_alpha"] = config.get("lora_alpha", config["r"])
    out["use_rslora"] = bool(config.get("use_rslora", False))
    if isinstance(out["target_modules"], set):
        out["target_modules"] = sorted(out["target_modules"])
    return out


def serve_command(base: str, name: str, path: Path, rank: int) -> list[str]:
    """The ``vllm serve`` argv for ``base`` with one LoRA adapter. Pure."""
    return ["vllm", "serve", base, "--enable-lora", "--lora-modules", f"{name}={path}",
            "--max-lora-rank", str(max_lora_rank(rank))]


def serve_script(argv: list[str]) -> str:
    return ("#!/bin/sh\n# Written by `edge-tune export --vllm`: serves the base with this "
            "adapter on an OpenAI-compatible API\n# (clients ask for model=NAME).\n"
            f"exec {shlex.join(argv)} \"$@\"\n")


def export(peft_dir: Path, out_dir: Path, name: str, base: str) -> dict:
    """Copy ``peft_dir`` to ``out_dir/name`` with a vLLM-ready config and write
    ``out_dir/serve.sh``. All or nothing per file (temp, then rename)."""
    from edge_tune.fsutil import atomic_path, write_text_atomic

    peft_dir, out_dir = Path(peft_dir), Path(out_dir)
    try:
        config = json.loads((peft_dir / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{peft_dir / CONFIG}: cannot read the PEFT config ({exc})") from None
    if not (peft_dir / WEIGHTS).is_file():
        raise DataError(f"{peft_dir}: no {WEIGHTS} (vLLM loads safetensors adapters)")
    config = vllm_config(config, base, str(peft_dir / CONFIG))
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError("exists and is not a directory",
                         setting="vllm", value=out_dir)
    target = (out_dir / name).resolve()
    with atomic_path(target) as tmp:
        tmp.mkdir()
        shutil.copy2(peft_dir / WEIGHTS, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        readme = peft_dir / "README.md"
        if readme.is_file():
            shutil.copy2(readme, tmp / "README.md")
    argv = serve_command(base, name, target, config["r"])
    script = out_dir / "serve.sh"
    write_text_atomic(script, serve_script(argv))
    script.chmod(0o755)
    return {"adapter_dir": str(target), "command": shlex.join(argv), "script": str(script),
            "rank": config["r"], "max_lora_rank": max_lora_rank(config["r"]), "base": base}
