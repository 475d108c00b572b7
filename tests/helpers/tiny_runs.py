"""Run directories built in seconds, laid out as `train` writes them, without training: a LoRA
run (adapter.gguf on a tiny random base), a full fine-tuning run (its model GGUF) and a run
whose PEFT weights file is cut short. For the tests of what commands say about such runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def make_tiny_runs(root: Path, default_gguf: Path) -> dict[str, Path]:
    """{"base": tiny GGUF, "lora": run dir with adapter.gguf, "full": full fine-tuning run dir
    (its model GGUF is a copy of the tiny base), "peft": LoRA run dir whose
    adapter/adapter_model.safetensors header promises more than the file holds}."""
    from tests.helpers.tiny_models import tiny_adapter, tiny_llama_gguf

    root.mkdir(parents=True, exist_ok=True)
    base = tiny_llama_gguf(root / "tiny.gguf", default_gguf)
    runs = {"base": base}
    for kind in ("lora", "full", "peft"):
        run = root / kind
        run.mkdir()
        man = {"format": "edge-tune-run/1", "kind": "full" if kind == "full" else "lora",
               "base": {"gguf": str(base)}, "adapter": {"peft": "adapter"}}
        if kind == "full":
            shutil.copyfile(base, run / "model.gguf")
            man["model"] = {"hf": "model", "gguf": "model.gguf"}
        else:
            tiny_adapter(run / "adapter.gguf")
            man["adapter"]["gguf"] = "adapter.gguf"
        if kind == "peft":
            (run / "adapter").mkdir()
            (run / "adapter" / "adapter_config.json").write_text(json.dumps(
                {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
            # an 8-byte header length of 4096, then the file ends inside the JSON header
            (run / "adapter" / "adapter_model.safetensors").write_bytes(
                (4096).to_bytes(8, "little") + b'{"a": ')
        (run / "manifest.json").write_text(json.dumps(man))
        runs[kind] = run
    return runs
