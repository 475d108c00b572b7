"""``manifest.json``: everything needed to reproduce a run and to run its adapter later.

The file is one JSON object (format ``edge-tune-run/1``) written by ``train``; :class:`Manifest`
is its typed form. Sections are dataclasses with the fields the code reads; any other key (an
older or newer edge-tune's) is kept in ``extra`` and written back, so ``Manifest.load(p)
.to_dict()`` is the file's own object, key order included. Keys a run did not write (older
runs lack ``chat_template_name``, ``plan``...) load as None and are not written back.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
import typing
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Optional

from edge_tune import __version__
from edge_tune.errors import DataError
from edge_tune.fsutil import write_text_atomic

MANIFEST = "manifest.json"
FORMAT = "edge-tune-run/1"
_LIBRARIES = ("torch", "transformers", "peft", "gguf", "llama-cpp-python", "mlx", "mlx-lm",
              "unsloth", "numpy")
_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "an object"}


def _json_type(value: Any) -> str:
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number",
            str: "a string", list: "a list", dict: "an object"}.get(type(value),
                                                                    type(value).__name__)


@dataclass(kw_only=True)
class _Record:
    """A section of the manifest: typed fields plus ``extra`` (keys this version does not
    read). ``to_dict`` writes the keys it was read with, in their order, then fields set
    since (a field left at its default and never read is not written)."""

    extra: dict = field(default_factory=dict)
    _keys: tuple = field(default=(), repr=False, compare=False)
    _ALWAYS: ClassVar[tuple] = ()  # written even when left at the default

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> "_Record":
        """The record of a JSON object; DataError naming ``where``.field for a wrong type."""
        if not isinstance(data, dict):
            raise DataError(f"{where or 'manifest'}: expected an object, got {_json_type(data)}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")
                 and f.name != "extra"}
        values: dict = {}
        extra: dict = {}
        for key, value in data.items():
            if key in names:
                values[key] = _checked(hints[key], value, f"{where}.{key}" if where else key)
            else:
                extra[key] = value
        return cls(**values, extra=extra, _keys=tuple(data))

    def to_dict(self) -> dict:
        """The JSON object, as the file holds it."""
        fields = {f.name: f for f in dataclasses.fields(self)
                  if not f.name.startswith("_") and f.name != "extra"}
        out: dict = {}
        for key in [*self._keys, *fields, *self.extra]:
            if key in out:
                continue
            if key in fields:
                value = getattr(self, key)
                if key not in self._keys and key not in self._ALWAYS and \
                        value == _default(fields[key]):
                    continue
                out[key] = value.to_dict() if isinstance(value, _Record) else copy.deepcopy(value)
            elif key in self.extra:
                out[key] = copy.deepcopy(self.extra[key])
        return out


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _checked(hint: Any, value: Any, where: str) -> Any:
    """``value`` if it has the type ``hint`` names (Optional, str/int/float/bool, list[str],
    dict, a record), else DataError ``where: expected ..., got ...``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if isinstance(hint, type) and issubclass(hint, _Record):
        return hint.from_dict(value, where)
    origin = typing.get_origin(hint) or hint
    ok = isinstance(value, origin) and not (isinstance(value, bool) and origin in (int, float))
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True  # JSON writes 32.0 as 32 too
    if ok and origin is list and args:
        bad = next((i for i, v in enumerate(value) if not isinstance(v, args[0])), None)
        if bad is not None:
            raise DataError(f"{where}[{bad}]: expected {_JSON_NAMES[args[0]]}, got "
                            f"{_json_type(value[bad])}")
    if not ok:
        raise DataError(f"{where}: expected {_JSON_NAMES.get(origin, origin)}, got "
                        f"{_json_type(value)}")
    return value


@dataclass(kw_only=True)
class Base(_Record):
    """The base model: what was asked for (``spec``), the HF weights trained on, the GGUF
    the adapter runs on (given, or ``converted`` from the weights) and its sha256."""

    spec: Optional[str] = None
    hf_dir: Optional[str] = None
    gguf: Optional[str] = None
    sha256: Optional[str] = None
    arch: Optional[str] = None
    name: Optional[str] = None
    gguf_source: Optional[str] = None  # "given" or "converted"
    gguf_from: Optional[str] = None
    ollama: Optional[str] = None  # the Ollama model it was read from (a Modelfile's FROM)
    hub_id: Optional[str] = None
    unquantized_hub_id: Optional[str] = None


@dataclass(kw_only=True)
class Data(_Record):
    """The training data: its path and sha256, its format, record counts."""

    path: Optional[str] = None
    format: Optional[str] = None
    sha256: Optional[str] = None
    skipped: Optional[int] = None
    records: Optional[int] = None
    examples: Optional[int] = None
    val: Optional[str] = None  # the validation file, if one was given
    val_records: Optional[int] = None
    # what each file of a folder was for: {"train": [...], "valid": [...], "test": [...],
    # "unused": [...]} (absolute paths; hub splits by name); None for one file
    files: Optional[dict] = None
    # several sources, or a weighted one: [{"source", "weight", "read", "used"}]
    mix: Optional[list] = None
    # the system prompt every training record began with, when they all shared one (chat and
    # serve send it when a conversation has none); None: they differed, or had none
    system: Optional[str] = None


@dataclass(kw_only=True)
class Result(_Record):
    """What training reported (the worker's result; other keys stay in ``extra``)."""

    steps: Optional[int] = None
    final_loss: Optional[float] = None
    val_loss: Optional[float] = None
    tokens_per_second: Optional[float] = None
    train_seconds: Optional[float] = None
    peak_rss_bytes: Optional[int] = None
    examples: Optional[int] = None
    losses: Optional[list] = None
    # --save-total-limit's RUN/checkpoint-STEP folders: {"path", "step", "val_loss", "best"}
    checkpoints: Optional[list] = None


@dataclass(kw_only=True)
class Adapter(_Record):
    """The run's adapter files, relative to the run directory, and the GGUF's alpha/rank."""

    peft: str = "adapter"
    gguf: Optional[str] = None
    mlx: Optional[str] = None  # the native mlx-lm adapter directory (mlx backend)
    alpha: Optional[float] = None
    rank: Optional[int] = None


@dataclass(kw_only=True)
class FullModel(_Record):
    """A full fine-tuning run's model, relative to the run directory: the trained HF weights
    (``hf``: config.json + model.safetensors + tokenizer) and the GGUF made from them by
    llama.cpp's converter (``gguf``, of type ``quant``)."""

    hf: str = "model"
    gguf: Optional[str] = None
    quant: Optional[str] = None


@dataclass(kw_only=True)
class Hyperparameters(_Record):
    """The training config (:class:`edge_tune.config.TrainConfig` as a dict); the fields
    read after training are typed, the rest stay in ``extra``."""

    format: Optional[str] = None
    skip_invalid: Optional[bool] = None
    val_split: Optional[float] = None
    seed: Optional[int] = None
    system_mode: Optional[str] = None
    reasoning: Optional[str] = None  # auto | inline | drop: how reasoning was read
    rank: Optional[int] = None
    alpha: Optional[float] = None
    lr: Optional[float] = None


@dataclass(kw_only=True)
class Manifest(_Record):
    """A run's ``manifest.json``. ``chat_template``: the Jinja text the data was rendered with
    (chat, serve, verify, bundles and Modelfiles use it); ``stop_tokens``: token texts that end
    an answer; ``plan``: the planner's prediction (compare ``result.peak_rss_bytes``)."""

    format: str = FORMAT
    created: Optional[str] = None
    backend: Optional[str] = None
    backend_reason: Optional[str] = None
    # "lora" (an adapter on the base) or "full" (every weight trained: ``model`` holds the
    # result and ``adapter`` is empty); runs written before the key existed are LoRA runs
    kind: Optional[str] = None
    base: Base = field(default_factory=Base)
    chat_template: Optional[str] = None
    chat_template_name: Optional[str] = None
    chat_template_source: Optional[str] = None  # "--chat-template" or "model"
    stop_tokens: list[str] = field(default_factory=list)
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    data: Data = field(default_factory=Data)
    result: Result = field(default_factory=Result)
    adapter: Adapter = field(default_factory=Adapter)
    model: Optional[FullModel] = None
    plan: Optional[dict] = None
    versions: dict = field(default_factory=dict)
    _ALWAYS: ClassVar[tuple] = ("format",)

    @property
    def full(self) -> bool:
        """True for a full fine-tuning run (its result is a model, not an adapter)."""
        return self.kind == "full"

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        """Read ``path``. DataError, one line naming the file (and line, or field), for a file
        that cannot be read, is not JSON, is not an edge-tune manifest or has a field of the
        wrong type."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise DataError(f"{path}: cannot read the manifest ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise DataError(f"{path}: not a text file (expected a JSON manifest)") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        return cls.from_json(data, str(path))

    @classmethod
    def from_json(cls, data: Any, source: str = MANIFEST) -> "Manifest":
        """The manifest of a parsed JSON document; ``source`` names it in errors."""
        if not isinstance(data, dict):
            raise DataError(f"{source}: expected a JSON object (an edge-tune manifest), got "
                            f"{_json_type(data)}")
        fmt = data.get("format")
        if not isinstance(fmt, str) or not fmt.startswith("edge-tune-run/"):
            got = "missing" if "format" not in data else repr(fmt)
            raise DataError(f"{source}: format: {got} (expected {FORMAT!r})")
        try:
            return cls.from_dict(data)
        except DataError as exc:
            raise DataError(f"{source}: {exc}") from None

    def save(self, path: Path) -> Path:
        """Write the manifest to ``path`` atomically (temp file, then rename)."""
        path = Path(path)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path


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
          result: dict, tokenizer: dict, adapter: dict, plan: Optional[dict] = None,
          kind: str = "lora", model: Optional[dict] = None) -> Manifest:
    """Assemble the manifest. Pure but for the clock and the installed versions.

    ``tokenizer``: ``chat_template`` (the Jinja text the data was rendered with),
    ``chat_template_name`` (its built-in name, if it is one), ``chat_template_source``
    ("--chat-template" or "model") and ``stop_tokens``. ``result["target_modules"]``, the
    module names LoRA went on (the default and ``all-linear`` resolved against the model),
    replaces the requested ``config["target_modules"]``."""
    result = dict(result)
    if targeted := result.pop("target_modules", None):
        config = {**config, "target_modules": list(targeted)}
    return Manifest.from_json({
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "backend": backend,
        "backend_reason": backend_reason,
        "kind": kind,
        "base": base,
        "chat_template": tokenizer.get("chat_template"),
        "chat_template_name": tokenizer.get("chat_template_name"),
        "chat_template_source": tokenizer.get("chat_template_source"),
        "stop_tokens": tokenizer.get("stop_tokens", []),
        "hyperparameters": config,
        "data": data,
        "result": result,
        "adapter": adapter,
        **({"model": model} if model is not None else {}),
        "plan": plan,
        "versions": library_versions(),
    }, "the new manifest")


def write(run_dir: Path, manifest: Manifest) -> Path:
    """Write ``run_dir/manifest.json`` atomically."""
    return manifest.save(Path(run_dir) / MANIFEST)


def read(run_dir: Path) -> Optional[Manifest]:
    """The manifest of a run directory, or None when it has none (DataError for a bad one).
    A kept ``RUN/checkpoint-STEP`` folder reads as a run of its own (:func:`kept_checkpoint`),
    so every command that takes a run takes one."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return kept_checkpoint(Path(run_dir))
    return Manifest.load(path)


# a kept checkpoint (--save-total-limit; written by edge_tune.training.checkpoint.keep_adapter)
KEPT_PREFIX = "checkpoint-"
KEPT_INFO = "checkpoint.json"  # {"step", "val_loss"}: what the folder's adapter scored
KEPT_ADAPTER = "adapter"  # its PEFT adapter


def kept_checkpoint(folder: Path) -> Optional[Manifest]:
    """``RUN/checkpoint-STEP`` read as a run: RUN's manifest with the folder's adapter
    (``adapter/``, and ``adapter.gguf`` once exported into it) and the result as of that step
    (its validation loss, the loss curve up to it). None when ``folder`` is not a kept
    checkpoint of a finished run; DataError for an unreadable ``checkpoint.json``."""
    folder = Path(folder)
    info_path, run_manifest = folder / KEPT_INFO, folder.parent / MANIFEST
    if not (folder.name.startswith(KEPT_PREFIX) and info_path.is_file()
            and run_manifest.is_file()):
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        step = int(info["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{info_path}: unreadable checkpoint record ({exc})") from None
    man = copy.deepcopy(Manifest.load(run_manifest))
    gguf = folder / "adapter.gguf"
    man.adapter.peft, man.adapter.mlx = KEPT_ADAPTER, None
    man.adapter.gguf = gguf.name if gguf.is_file() else None
    losses = (man.result.losses or [])[:step]
    man.result.steps, man.result.val_loss, man.result.losses = step, info.get("val_loss"), losses
    man.result.final_loss = losses[-1] if losses else None
    man.result.checkpoints = None
    return man
