"""The training job: what ``api.train`` hands the training subprocess, typed.

A :class:`TrainJob` crosses a process boundary as JSON (``RUN/.job.json``, written by
``edge_tune.runner``, read by ``edge_tune.backends.worker``). Its *wire* fields are what the
parent decides; the worker then fills in what it prepares (the base model's HF directory,
the tokenized examples, the adapter directory, the SIGTERM handler) before a backend gets it.

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
from edge_tune.errors import EdgeTuneError
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
      training set; pad_id: the padding token id; adapter_dir: where the backend saves the
      PEFT adapter; interrupt: the worker's ``checkpoint.Interrupt`` (SIGTERM = cancel).

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
            raise EdgeTuneError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise EdgeTuneError(f"{where}: expected a JSON object, got {type(data).__name__}")
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
        raise EdgeTuneError(f"{where}: expected an object, got {type(data).__name__}")
    allowed = required if allowed is None else allowed
    unknown = sorted(set(data) - allowed)
    missing = sorted(required - set(data))
    problems = ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []) + \
        ([f"missing key(s) {', '.join(missing)}"] if missing else [])
    if problems:
        raise EdgeTuneError(f"{where}: {'; '.join(problems)} (expected "
                            f"{', '.join(sorted(allowed))})")
