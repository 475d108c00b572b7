"""Models in Ollama's local store, read from its manifests and blobs (``--model ollama:NAME``).

The layout is Ollama's own (its ``envconfig.Models``, ``server/modelpath.go`` ``GetBlobsPath``,
``server/manifest.go`` and ``types/model/name.go``):

- the store is ``$OLLAMA_MODELS``, else ``~/.ollama/models``;
- a model name is ``[host/][namespace/]model[:tag]``, filled with ``registry.ollama.ai``,
  ``library`` and ``latest``; parts are ASCII letters, digits, ``_ . -`` (no ``.`` in the
  namespace);
- its manifest is ``manifests/<host>/<namespace>/<model>/<tag>``: Docker/OCI image-manifest
  JSON whose ``layers`` each have ``mediaType``, ``digest`` (``sha256:<64 hex>``) and ``size``;
  ``application/vnd.ollama.image.model`` is the GGUF weights, other layers are the Go chat
  template, parameters, system prompt, license, LoRA adapters and vision projectors;
- a blob lives at ``blobs/sha256-<hex>`` (the digest with ``:`` made ``-``).

Blobs are content-addressed and Ollama checks a blob's sha256 when it writes it, so reading a
model here checks each blob's size against the manifest (which catches a truncated copy) and the
GGUF magic, not the whole hash: hashing a multi-GB model would cost more than resolving it.
Pure: standard library only.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from edge_tune.errors import DataError, Unsupported, UsageError

PREFIX = "ollama:"
DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_ADAPTER = "application/vnd.ollama.image.adapter"
MEDIA_PROJECTOR = "application/vnd.ollama.image.projector"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_SYSTEM = "application/vnd.ollama.image.system"

_PART = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_DIGEST = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")
_EXPECTED = "expected ollama:NAME[:TAG], e.g. ollama:llama3.2:1b or ollama:user/name"


@dataclass(frozen=True)
class OllamaName:
    """A fully qualified Ollama model name."""

    host: str
    namespace: str
    model: str
    tag: str

    @property
    def display(self) -> str:
        """The name as ``ollama list`` shows it and ``FROM`` takes it: ``model:tag``,
        ``namespace/model:tag`` off the default namespace, ``host/namespace/model:tag`` off
        the default registry."""
        if self.host != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    @property
    def manifest_parts(self) -> tuple[str, str, str, str]:
        return (self.host, self.namespace, self.model, self.tag)


def parse_name(text: str) -> OllamaName:
    """``[ollama:][host/][namespace/]model[:tag]`` -> the filled name; EdgeTuneError if it is
    not one (digest ``@...`` and build ``+...`` suffixes included: they name no local file)."""
    name = text[len(PREFIX):] if text.startswith(PREFIX) else text
    bad = UsageError(f"not an Ollama model name ({_EXPECTED})", setting="model", value=repr(text))
    path, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
    parts = path.split("/")
    if not name or len(parts) > 3 or (":" in name and not tag):
        raise bad
    host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
    if len(parts) == 3:
        host, namespace, model = parts
    elif len(parts) == 2:
        namespace, model = parts
    else:
        model = parts[0]
    tag = tag or DEFAULT_TAG
    for part in (host, namespace, model, tag):
        if not _PART.match(part) or ".." in part or part == ".":
            raise bad
    if "." in namespace:
        raise bad
    return OllamaName(host, namespace, model, tag)


def models_dir(env: Optional[Mapping[str, str]] = None) -> Path:
    """Ollama's store: ``$OLLAMA_MODELS``, else ``~/.ollama/models`` (as Ollama decides)."""
    env = os.environ if env is None else env
    value = env.get("OLLAMA_MODELS")
    return Path(value).expanduser() if value else Path.home() / ".ollama" / "models"


def blob_path(root: Path, digest: str) -> Path:
    """Where Ollama keeps the blob with ``digest`` (``sha256:<hex>``); ValueError if the
    digest is not a sha256 one (Ollama refuses those too: a digest is part of a path)."""
    if not _DIGEST.match(digest or ""):
        raise ValueError(digest)
    return Path(root) / "blobs" / digest.replace(":", "-")


@dataclass(frozen=True)
class OllamaModel:
    """A model found in the store: its GGUF weights blob and its other layers' blobs."""

    name: OllamaName
    root: Path
    manifest: Path
    gguf: Path
    digest: str  # the GGUF's sha256, hex
    size: int  # bytes
    layers: dict = field(default_factory=dict)  # media type -> [blob paths], other layers


def _manifest_file(root: Path, name: OllamaName) -> Path:
    exact = root.joinpath("manifests", *name.manifest_parts)
    if exact.is_file():
        return exact
    lower = root.joinpath("manifests", *(p.lower() for p in name.manifest_parts))
    return lower if lower.is_file() else exact  # older Ollama versions wrote lower case


def find(spec: str, env: Optional[Mapping[str, str]] = None) -> OllamaModel:
    """Resolve ``ollama:NAME[:TAG]`` in the local store without reading the weights. Raises
    EdgeTuneError (one line, exit 2) for a bad name, a model that is not there, a manifest that
    is not valid, a missing or truncated blob, or weights that are not a single GGUF."""
    env = os.environ if env is None else env
    name = parse_name(spec)
    root = models_dir(env)
    source = "$OLLAMA_MODELS" if env.get("OLLAMA_MODELS") else \
        "the default; set OLLAMA_MODELS if Ollama keeps its models elsewhere"
    if not (root / "manifests").is_dir():
        raise UsageError(f"no Ollama model store at {root} ({source})",
                         setting="model", value=spec)
    path = _manifest_file(root, name)
    if not path.is_file():
        raise UsageError(f"{name.display} is not in Ollama's local store at "
                         f"{root} ({source}): no manifest {path}; `ollama pull "
                         f"{name.display}` fetches it", setting="model", value=spec)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}; expected an Ollama "
                        "manifest)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the manifest ({exc})") from None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        raise DataError(f"{path}: layers: missing (expected an Ollama manifest with a "
                        "list of layers)")
    found: dict = {}
    weights = []
    for i, layer in enumerate(layers):
        media = layer.get("mediaType") if isinstance(layer, dict) else None
        digest = layer.get("digest") if isinstance(layer, dict) else None
        if not isinstance(media, str) or not isinstance(digest, str):
            raise DataError(f"{path}: layers[{i}]: expected an object with mediaType and "
                            "digest")
        try:
            blob = blob_path(root, digest)
        except ValueError:
            raise DataError(f"{path}: layers[{i}].digest: {digest!r} is not a sha256 digest "
                            "(expected sha256:<64 hex digits>)") from None
        if media == MEDIA_MODEL:
            weights.append((i, layer, blob))
        else:
            found.setdefault(media, []).append(blob)
    if len(weights) != 1:
        what = "no" if not weights else f"{len(weights)}"
        raise DataError(f"{path}: layers: {what} {MEDIA_MODEL} layers (expected exactly one "
                        "GGUF weights layer)")
    if MEDIA_ADAPTER in found:
        raise DataError(f"{name.display} carries a LoRA adapter layer; "
                        "edge-tune trains on base weights, so give the model it was "
                        "created FROM", setting="model", value=spec)
    i, layer, blob = weights[0]
    if not blob.is_file():
        raise DataError(f"the weights blob {blob} named by {path} is missing "
                        f"(`ollama pull {name.display}` fetches it again)",
                        setting="model", value=spec)
    size = blob.stat().st_size
    expected = layer.get("size")
    if isinstance(expected, int) and expected != size:
        raise DataError(f"{blob}: {size} bytes where {path} says {expected} (a truncated or "
                        f"damaged copy; `ollama pull {name.display}` fetches it again)")
    with open(blob, "rb") as f:
        if f.read(4) != b"GGUF":
            raise Unsupported(f"{blob}: {name.display}'s weights are not a GGUF file "
                              "(expected a GGUF model; Ollama's safetensors-based models are "
                              "not supported)")
    digest = _DIGEST.match(layer["digest"]).group(1).lower()
    return OllamaModel(name, root, path, blob, digest, size, found)
