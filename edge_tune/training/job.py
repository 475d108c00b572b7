"""The training job: what ``api.train`` hands the training subprocess, typed, and what comes
back (:class:`WorkerResult`).

A :class:`TrainJob` crosses a process boundary as JSON (``RUN/.job.json``, written by
``edge_tune.training.runner``, read by ``edge_tune.training.worker``). Its *wire* fields are
what the parent decides; the worker then fills in what it prepares (the base model's HF
directory, the tokenized examples, the adapter directory, the SIGTERM handler) before a
backend gets it.

The contract is strict in both directions: :meth:`TrainJob.from_json` / :meth:`from_dict`
refuse a key that is not a field and a wire field that is missing, and the config inside is a
:class:`~edge_tune.config.TrainConfig`, so a backend that reads a setting the config does not
have fails with ``AttributeError`` instead of reading a silent default.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from edge_tune.config import TrainConfig
from edge_tune.errors import DataError
from edge_tune.models import ModelRef

_WORKER = {"wire": False}  # metadata of the fields the worker fills in; never serialized


@dataclass
class TrainJob:
    """One training run as the worker and every backend see it.

    Wire fields (parent -> worker):
      config: the run's settings; backend: a name in ``registry.BACKENDS``;
      model_ref: the resolved ``--model``; base_sha256: the base GGUF's digest (or None);
      records / val_records: training / validation records (``data.formats.job_record``
      dicts); records is None under torchrun, where each rank streams ``records_file``
      (JSON lines) and keeps its shard; run_dir: the run directory (rank 0 writes it);
      physical_cores / cpu_has_bf16: the host, as probed by the parent; resume_from: the
      checkpoint directory a resumed run continues, or None; chat_template: Jinja text that
      replaces the tokenizer's own, or None.

    Worker fields (filled in by the worker, in this process only):
      hf_dir: the base in HF format; examples / val_examples: tokenized ``Example`` lists
      (validation on rank 0 only); example_index: each example's record index in the whole
      training set; replay_examples: positions in ``examples`` of ``--replay`` records
      (records with ``"replay": true``: the KL-to-base term's); pad_id: the padding token
      id; adapter_dir: where the backend saves the PEFT adapter; interrupt: the worker's
      ``checkpoint.Interrupt`` (SIGTERM = cancel).

    Every field has a default so that in-process callers (tests, benchmarks) can build a job
    with the fields they use (:meth:`of`); the JSON path requires them all (:meth:`from_dict`).
    """

    config: TrainConfig = field(default_factory=TrainConfig)
    backend: str = "cpu"
    model_ref: Optional[ModelRef] = None
    base_sha256: Optional[str] = None
    records: Optional[list[dict]] = None
    val_records: list[dict] = field(default_factory=list)
    run_dir: Optional[str] = None
    physical_cores: int = 1
    cpu_has_bf16: bool = False
    resume_from: Optional[str] = None
    chat_template: Optional[str] = None
    records_file: Optional[str] = None  # set by the runner for torchrun (records is then None)

    hf_dir: Optional[str] = field(default=None, metadata=_WORKER)
    examples: list = field(default_factory=list, metadata=_WORKER)
    val_examples: list = field(default_factory=list, metadata=_WORKER)
    example_index: Optional[list[int]] = field(default=None, metadata=_WORKER)
    replay_examples: list[int] = field(default_factory=list, metadata=_WORKER)
    pad_id: int = field(default=0, metadata=_WORKER)
    adapter_dir: Optional[str] = field(default=None, metadata=_WORKER)
    interrupt: Any = field(default=None, metadata=_WORKER)

    # --- the wire format ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The wire fields as JSON-ready values (paths as strings)."""
        out = {}
        for f in wire_fields():
            value = getattr(self, f.name)
            if f.name == "config":
                value = value.to_dict()
            elif f.name == "model_ref" and value is not None:
                value = {k: (str(v) if isinstance(v, Path) else v)
                         for k, v in dataclasses.asdict(value).items()}
            out[f.name] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "training job") -> TrainJob:
        """The inverse of :meth:`to_dict`. Raises EdgeTuneError naming every unknown key and
        every missing wire field (``records_file`` may be absent: one process needs none),
        in the job and in its config."""
        names = {f.name for f in wire_fields()}
        _exact(data, names - {"records_file"}, names, where)
        _exact(data["config"], {f.name for f in fields(TrainConfig)}, None, f"{where}: config")
        return cls(**{**data, "config": TrainConfig(**data["config"]),
                      "model_ref": _model_ref(data["model_ref"], where)})

    @classmethod
    def from_json(cls, text: str, where: str = "training job") -> TrainJob:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, where)

    @classmethod
    def of(cls, job: TrainJob | Mapping) -> TrainJob:
        """``job`` itself, or a job built in-process from a mapping of some of the fields
        (wire or worker); a key that is no field is refused, the config may be a mapping of
        some of its settings (see :func:`as_config`)."""
        if isinstance(job, TrainJob):
            return job
        known = {f.name for f in fields(cls)}
        _exact(job, set(), known, "training job")
        values = dict(job)
        if "config" in values:
            values["config"] = as_config(values["config"])
        if "model_ref" in values:
            values["model_ref"] = _model_ref(values["model_ref"], "training job")
        return cls(**values)


# Fields a backend (or the worker) sets only where they apply; :meth:`WorkerResult.to_dict`
# leaves them out when unset, as the dicts results were before them did.
_WHERE_SET = {"where_set": True}


@dataclass
class WorkerResult:
    """What one training run returns: the backend's figures, completed by the worker.

    It crosses the process boundary as ``Done.result`` (a JSON object: :meth:`to_dict` /
    :meth:`from_dict`) and is saved beside the trained adapter as ``training_result.json``
    (the same object plus ``"backend"``), so ``train --resume`` can finish a run without
    training again.

    From the backend (``registry.TrainFn``): steps (optimizer steps); final_loss (the last
    steps' mean training loss, nats per token); val_loss (the last validation loss, None
    without validation); tokens (trained tokens over all ranks); tokens_per_second;
    train_seconds (training only, validation left out); precision ("fp32", "bf16",
    "nf4+bf16", ...); trainable_parameters; losses (per optimizer step, 6 decimals);
    examples (training examples over all ranks; the worker's count when a backend gives
    none); world_size (processes; cpu and unsloth); mlx_adapter (the mlx backend's native
    adapter folder in the run, LoRA runs); gpu, peak_vram_bytes (unsloth: the device name,
    torch's peak allocation in bytes).

    From the worker: hf_dir (the base in HF format); target_modules (the module names LoRA
    went on, resolved against the model; None for a full run); peak_rss_bytes (the training
    process's peak resident memory); tokenizer (``chat_template``: the Jinja text the data
    was rendered with; ``stop_tokens``: token texts).
    """

    examples: Optional[int] = None
    steps: int = 0
    final_loss: Optional[float] = None
    val_loss: Optional[float] = None
    tokens: int = 0
    tokens_per_second: float = 0.0
    train_seconds: float = 0.0
    precision: str = ""
    trainable_parameters: int = 0
    losses: list[float] = field(default_factory=list)
    world_size: Optional[int] = field(default=None, metadata=_WHERE_SET)
    mlx_adapter: Optional[str] = field(default=None, metadata=_WHERE_SET)
    gpu: Optional[str] = field(default=None, metadata=_WHERE_SET)
    peak_vram_bytes: Optional[int] = field(default=None, metadata=_WHERE_SET)
    hf_dir: Optional[str] = None
    target_modules: Optional[list[str]] = field(default=None, metadata=_WHERE_SET)
    peak_rss_bytes: Optional[int] = None
    tokenizer: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON object, in field order; the fields set only where they apply are left
        out when unset."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not (f.metadata.get("where_set") and getattr(self, f.name) is None)}

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "training result") -> WorkerResult:
        """The inverse of :meth:`to_dict`; a key that is no field is refused (EdgeTuneError,
        naming it), a missing one keeps its default."""
        _exact(data, set(), {f.name for f in fields(cls)}, where)
        return cls(**data)


def wire_fields() -> list[dataclasses.Field]:
    """The fields of :class:`TrainJob` that cross the process boundary, in order."""
    return [f for f in fields(TrainJob) if f.metadata.get("wire", True)]


def as_config(cfg: TrainConfig | Mapping) -> TrainConfig:
    """``cfg`` as a TrainConfig: a mapping gives some settings by name (the rest keep their
    defaults, as in ``TrainConfig(...)``); a name that is no setting is refused."""
    if isinstance(cfg, TrainConfig):
        return cfg
    _exact(cfg, set(), {f.name for f in fields(TrainConfig)}, "training config")
    return TrainConfig(**cfg)


def _model_ref(value: Any, where: str) -> Optional[ModelRef]:
    if value is None or isinstance(value, ModelRef):
        return value
    _exact(value, {"spec"}, {f.name for f in fields(ModelRef)}, f"{where}: model_ref")
    return ModelRef(**{k: (Path(v) if k in ("gguf", "hf_dir") and v else v)
                       for k, v in value.items()})


def _exact(data: Any, required: set[str], allowed: Optional[set[str]], where: str) -> None:
    """Refuse a non-mapping, keys outside ``allowed`` (None: exactly ``required``) and
    missing ``required`` keys, all named in one line."""
    if not isinstance(data, Mapping):
        raise DataError(f"{where}: expected an object, got {type(data).__name__}")
    allowed = required if allowed is None else allowed
    unknown = sorted(set(data) - allowed)
    missing = sorted(required - set(data))
    problems = ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []) + \
        ([f"missing key(s) {', '.join(missing)}"] if missing else [])
    if problems:
        raise DataError(f"{where}: {'; '.join(problems)} (expected "
                        f"{', '.join(sorted(allowed))})")
