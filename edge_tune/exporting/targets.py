"""Where an export goes beyond its files: ``ollama create`` of the ``--ollama`` Modelfile when
Ollama is installed, and the merged GGUF placed in LM Studio's models folder (``--lmstudio``;
LM Studio loads no LoRA adapter, so it gets the merged model)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Mapping, Optional

from edge_tune.events import EventSink, Log
from edge_tune.fsutil import atomic_path

#: LM Studio lists a model by its folder: ``MODELS/PUBLISHER/REPO/FILE.gguf``.
LMSTUDIO_PUBLISHER = "edge-tune"
_RUN_FILES = re.compile(r"^(adapter|model|merged)(-[\w.]+)?\.gguf$", re.IGNORECASE)


def ollama_name(gguf: Path) -> str:
    """The name ``ollama create`` gets for an export: its run directory's name for the files a
    run holds (``RUN/adapter.gguf``, ``RUN/merged-q4_k_m.gguf``), else the file's stem; lower
    case, characters outside Ollama's ``[a-z0-9_.-]`` made ``-``."""
    gguf = Path(gguf).resolve()
    raw = gguf.parent.name if _RUN_FILES.match(gguf.name) else gguf.stem
    return re.sub(r"[^a-z0-9_.-]+", "-", raw.lower()).strip("-.") or "edge-tune"


def ollama_create(modelfile: Path, name: str, on_event: EventSink,
                  env: Optional[Mapping[str, str]] = None) -> Optional[list[str]]:
    """Run ``ollama create NAME -f Modelfile`` (in the Modelfile's folder, whose relative
    paths it reads) when an ``ollama`` binary is on PATH; say what ran, or why nothing did.
    A failure (no server running, an Ollama too old for RENDERER/PARSER) is a warning with
    Ollama's last line: the Modelfile is written and the command can be run again. Returns
    the command run, or None."""
    exe = shutil.which("ollama", path=(env or os.environ).get("PATH"))
    cmd = ["ollama", "create", name, "-f", str(modelfile)]
    if exe is None:
        on_event(Log(f"--ollama: no `ollama` on PATH, so the model was not created; run: "
                     f"{' '.join(cmd)}"))
        return None
    on_event(Log(f"--ollama: running {' '.join(cmd)}"))
    proc = subprocess.run([exe, *cmd[1:]], cwd=Path(modelfile).parent, capture_output=True,
                          text=True, env=None if env is None else dict(env))
    if proc.returncode != 0:
        last = ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]
        on_event(Log(f"--ollama: `{' '.join(cmd)}` failed (exit {proc.returncode}: {last}); "
                     "the Modelfile is written: fix that and run it again", "warning"))
        return cmd
    on_event(Log(f"--ollama: created {name} (ollama run {name})"))
    return cmd


def place_for_lmstudio(gguf: Path, run_name: str, quant: Optional[str], on_event: EventSink,
                       models_dir: Optional[Path] = None) -> Path:
    """Put a merged (or full) model GGUF where LM Studio lists it:
    ``MODELS/edge-tune/RUN/RUN-QUANT.gguf`` (``MODELS``: ``models_dir``, else
    :func:`edge_tune.models.lmstudio_models_dir`). A hard link when on the same file system,
    else a copy, written under a temporary name and renamed, so LM Studio never lists half a
    file. Returns the path."""
    from edge_tune import models

    root = Path(models_dir) if models_dir is not None else models.lmstudio_models_dir()
    run = re.sub(r"[^\w.-]+", "-", run_name).strip("-.") or "model"
    dst = root / LMSTUDIO_PUBLISHER / run / f"{run}-{quant or 'model'}.gguf"
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        try:
            os.link(gguf, tmp)
        except OSError:
            shutil.copyfile(gguf, tmp)
    on_event(Log(f"--lmstudio: placed {dst} (LM Studio lists it as "
                 f"{LMSTUDIO_PUBLISHER}/{run})"))
    return dst
