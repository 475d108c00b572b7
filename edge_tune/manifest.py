"""``manifest.json``: everything needed to reproduce a run and to run its adapter later."""

from __future__ import annotations

import datetime as _dt
import json
from importlib import metadata
from pathlib import Path
from typing import Optional

from edge_tune import __version__
from edge_tune.errors import EdgeTuneError
from edge_tune.fsutil import write_text_atomic

MANIFEST = "manifest.json"
_LIBRARIES = ("torch", "transformers", "peft", "gguf", "llama-cpp-python", "mlx", "mlx-lm",
              "unsloth", "numpy")


def library_versions() -> dict[str, str]:
    """Installed versions, read from package metadata (no imports)."""
    out = {"edge-tune": __version__}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def build(*, config: dict, backend: str, backend_reason: str, base: dict, data: dict,
          result: dict, tokenizer: dict, adapter: dict, plan: Optional[dict] = None) -> dict:
    """Assemble the manifest. Pure.

    ``tokenizer``: ``chat_template`` (the Jinja text the data was rendered with; chat, serve,
    verify, bundles and Modelfiles use it), ``chat_template_name`` (its built-in name, if it is
    one), ``chat_template_source`` ("--chat-template" or "model") and ``stop_tokens``."""
    return {
        "format": "edge-tune-run/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "backend": backend,
        "backend_reason": backend_reason,
        "base": base,
        "chat_template": tokenizer.get("chat_template"),
        "chat_template_name": tokenizer.get("chat_template_name"),
        "chat_template_source": tokenizer.get("chat_template_source"),
        "stop_tokens": tokenizer.get("stop_tokens", []),
        "hyperparameters": config,
        "data": data,
        "result": result,
        "adapter": adapter,
        "plan": plan,  # the planner's prediction (compare result.peak_rss_bytes)
        "versions": library_versions(),
    }


def write(run_dir: Path, manifest: dict) -> Path:
    path = Path(run_dir) / MANIFEST
    write_text_atomic(path, json.dumps(manifest, indent=2) + "\n")
    return path


def read(run_dir: Path) -> Optional[dict]:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EdgeTuneError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
