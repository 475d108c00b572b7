"""``train``: a LoRA adapter (or a full fine-tune) trained in a subprocess
(:mod:`edge_tune.training.runner`), exported to GGUF, recorded in the run's manifest and checked by
llama.cpp.

One pipeline of typed stages: preflight (:func:`edge_tune.runs.preflight`) → data
(:class:`Prepared`) → plan → launch (:func:`edge_tune.training.runner.launch`) → package and check
(:mod:`edge_tune.exporting.run`)."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edge_tune import runs
from edge_tune.training import runner
from edge_tune.adapters import TrainingBase, training_base
from edge_tune.config import TrainConfig
from edge_tune.data.training import TrainingData, data_record, read_training_data
from edge_tune.events import EventSink, Log, ignore
from edge_tune.exporting.run import (TrainResult, Trained, check, completing, finish_run,
                                     package)
from edge_tune.hardware import probe
from edge_tune.planner import PLANNED, Plan, check_plan, describe, fit_plan
from edge_tune.replay import SOURCE as REPLAY_SOURCE
from edge_tune.replay import for_run as replay_for_run


def train(cfg: Optional[TrainConfig], on_event: EventSink = ignore,
          cancel: Optional[threading.Event] = None,
          resume: Optional[Path] = None, data: Optional[list] = None) -> TrainResult:
    """Train a LoRA adapter (or, with ``cfg.full``, every weight) in a subprocess, export it
    to GGUF (an adapter, or the whole model), write the manifest and verify with llama.cpp.

    ``resume``: a run directory whose training was cancelled; its saved config is used
    (``cfg`` must be None) and training continues from its checkpoint to the same total
    steps. A run whose training finished but whose later steps failed (disk full, killed)
    is completed from its saved adapter, without training again. ``data``: with ``resume``,
    where the run's training data is now (checked against the sha256 it started with).

    Raises DiskFull (exit 2) before any work when the run's filesystem lacks the space the
    plan says it writes, and when a write runs out of space (naming what was kept)."""
    if resume is not None and cfg is None and runs.training_finished(resume):
        return finish_run(Path(resume), on_event)  # only the steps after training are left
    pre = runs.preflight(cfg, resume, data, probe())
    prepared = _prepare(pre, on_event)
    cfg, run_plan = _plan(pre, prepared, on_event)
    # What the manifest needs besides training's result, kept in RUN_CONFIG: a run whose
    # last steps failed is then finished without its data (finish_run).
    finish = {"backend_reason": pre.why, "data": _data_record(pre, prepared),
              "plan": run_plan.to_dict() if run_plan is not None else None}
    base = prepared.base
    run = runs.open_run(pre, cfg, run_plan, base.ref.gguf, base.sha256, finish, on_event)
    trained = Trained(run.dir, cfg, _launch(pre, prepared, cfg, run, on_event, cancel),
                      base.ref, pre.chosen, base.sha256, pre.backend, pre.why, finish)
    on_event(Log(f"training finished: {runs.trained_dir(run.dir, cfg.full)} saved"))
    with completing(trained):
        return check(package(trained, on_event), on_event)


@dataclass
class Prepared:
    """The data stage's result: the run's data read and split (``data``), its base, and
    ``replayed``: the replay records mixed into the training records (``records``)."""
    data: TrainingData
    base: TrainingBase
    replayed: list
    records: list


def _prepare(pre: runs.Preflight, on_event: EventSink) -> Prepared:
    """Read and split the data, settle the base (resolved, its chat template, runnable by
    llama.cpp) and mix in ``--replay``'s records; then say which backend and, for DoRA, that
    there will be no adapter GGUF."""
    cfg = pre.cfg
    data = read_training_data(cfg, pre.spec, on_event)
    base = training_base(cfg.model, pre.chosen, data.train + data.val, on_event)
    replayed = replay_for_run(cfg, base.ref, base.sha256, pre.chosen, len(data.train),
                              on_event)
    on_event(Log(f"backend: {pre.backend} ({pre.why})"))
    if cfg.dora:
        on_event(Log("--dora: a DoRA adapter has no GGUF LoRA form (llama.cpp has no magnitude "
                     "vectors): this run writes no adapter.gguf; export it with `edge-tune "
                     "export RUN --merge` (one GGUF with the adapter merged, verified)",
                     "warning"))
    # the loop shuffles; validation stays the user's
    return Prepared(data, base, replayed, data.train + replayed)


def _plan(pre: runs.Preflight, prepared: Prepared, on_event: EventSink
          ) -> tuple[TrainConfig, Optional[Plan]]:
    """The settings the run trains with: a new run's fitted to this machine's memory (the
    planner may change :data:`~edge_tune.planner.PLANNED`; one that cannot fit is refused); a
    resumed run keeps the settings it was planned with. The plan is None when the model's
    shape cannot be read."""
    if pre.resume is not None:
        return pre.cfg, None
    run_plan = fit_plan(pre.cfg, prepared.base.ref, pre.backend, pre.hw, prepared.records)
    if run_plan is None:
        return pre.cfg, None
    check_plan(run_plan)
    on_event(Log(describe(run_plan)))
    return dataclasses.replace(pre.cfg, **{k: getattr(run_plan.config, k) for k in PLANNED}), \
        run_plan


def _data_record(pre: runs.Preflight, prepared: Prepared) -> dict:
    """The manifest's ``data``: what was read (:func:`edge_tune.data.training.data_record`)
    and the replay records mixed in."""
    record = data_record(prepared.data, pre.spec, pre.cfg, pre.data_sha256)
    if prepared.replayed:
        record["replay"] = {"records": len(prepared.replayed),
                            "prompts": "edge_tune/" + REPLAY_SOURCE,
                            "answers": "the base's own, greedy"}
    return record


def _launch(pre: runs.Preflight, prepared: Prepared, cfg: TrainConfig, run: runs.OpenRun,
            on_event: EventSink, cancel: Optional[threading.Event]):
    """Training in its subprocess: the job (the wire contract: ``TrainJob``, a key it does not
    have is an error) and the worker's result. A resumed run continues from its checkpoint."""
    ref, hw = prepared.base.ref, pre.hw
    job = {
        "config": cfg.to_dict(),
        "backend": pre.backend,
        "model_ref": {"spec": ref.spec, "gguf": str(ref.gguf) if ref.gguf else None,
                      "hf_dir": str(ref.hf_dir) if ref.hf_dir else None, "hub_id": ref.hub_id},
        "base_sha256": prepared.base.sha256,
        "records": prepared.records,
        "val_records": prepared.data.val,
        "run_dir": str(run.dir),
        "physical_cores": hw.physical_cores,
        "cpu_has_bf16": hw.has_bf16_cpu,
        "resume_from": str(run.checkpoint) if run.checkpoint is not None else None,
        "chat_template": pre.chosen.text if pre.chosen else None,  # replaces the tokenizer's
    }
    with runs.removed_if_refused(run, cfg.full):
        return runner.launch(job, run.dir, on_event, cancel, cfg.report_to, cfg.to_dict())
