"""``train``: a LoRA adapter (or a full fine-tune) trained in a subprocess
(:mod:`edge_tune.training.runner`), exported to GGUF, recorded in the run's manifest and checked by
llama.cpp."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edge_tune import manifest as manifest_mod
from edge_tune import models, tracking
from edge_tune.training import registry
from edge_tune.training.job import WorkerResult
from edge_tune.commands.convert import check_llama_cpp_computes_as_hf
from edge_tune.commands.export import export
from edge_tune.commands.plan import (PLANNED, check_plan, fit_plan, job_record,
                                     planner_describe, read_data, read_train_data)
from edge_tune.verify import verify_hook
from edge_tune.config import TrainConfig
from edge_tune.data.preference import check_method
from edge_tune.data.split import split_validation
from edge_tune.errors import CheckFailed, DataError, EdgeTuneError, UsageError
from edge_tune.events import Done, EventSink, Log, ignore
from edge_tune.fsutil import (disk_full_says, remove_tree, sha256_file, sweep_leftovers,
                              write_text_atomic)
from edge_tune.hardware import probe
from edge_tune.replay import SOURCE as REPLAY_SOURCE
from edge_tune.runs import (RUN_CONFIG, finished_training, load_run_config, prepare_run_dir,
                            resume_state)
from edge_tune.templates import choice as template_choice


FULL_BACKENDS = ("cpu", "mlx")  # the backends that train every weight with --full
FULL_MODEL_GGUF = "model.gguf"  # a full run's model as llama.cpp runs it (F16)


@dataclass
class TrainResult:
    """A finished run: its directory and its manifest (as written to manifest.json)."""
    run_dir: Path
    manifest: manifest_mod.Manifest


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
    from edge_tune.training.checkpoint import CHECKPOINT
    from edge_tune.training.job import TrainJob
    from edge_tune.training.worker import TRAINING_RESULT
    from edge_tune.training.runner import TrainingProcess

    saved = None
    if resume is not None:
        if cfg is not None:
            raise EdgeTuneError("--resume continues a run with its own settings; give no other "
                                "training options")
        if training_finished(resume):  # only the steps after training are left to do
            return finish_run(Path(resume), on_event)
        if resume_state(resume) is None:
            raise EdgeTuneError(f"--resume {resume}: nothing to resume (the run finished or "
                                f"has no {RUN_CONFIG})")
        cfg, saved = load_run_config(resume, data)
    elif data is not None:
        raise UsageError("--data with --resume only: give it in the run's settings")
    assert cfg is not None
    from edge_tune.data.layouts import data_spec
    from edge_tune.data.readers import data_fingerprint

    spec = data_spec(cfg.data, cfg.columns, cfg.max_samples, cfg.seed)  # bad specs: one line
    models.check_spec(cfg.model)  # bad input fails fast, before any download or heavy work
    chosen = template_choice.given(cfg.chat_template)
    tracking.check(cfg.report_to)  # a tracker that is not installed: one line, first
    hw = probe()
    backend, why = registry.choose(cfg.backend, hw)  # an unusable backend: one line, first
    if resume is not None and not registry.capabilities(backend).resumable:
        raise EdgeTuneError(f"--resume {resume}: resuming is supported for the "
                            f"{' and '.join(registry.having('resumable'))} "
                            f"backends; this run uses {backend}: start it again")
    if (cfg.nproc > 1 or cfg.nnodes > 1) and not registry.capabilities(backend).multi_process:
        raise EdgeTuneError(f"--nproc/--nnodes: multi-process training runs on the cpu (gloo) "
                            f"and unsloth (NCCL) backends, not {backend}")
    if registry.capabilities(backend).device == "cuda" and cfg.nproc > len(hw.cuda_gpus):
        raise EdgeTuneError(f"--nproc {cfg.nproc}: the {backend} backend runs one process per GPU "
                            f"and this node has {len(hw.cuda_gpus)}")
    # One file: its sha256; folders, mixes: all parts. Hashed once: a new run as stored
    # (absolute paths: what a resume compares), a resumed one as found now.
    if resume is None:
        data_sha256 = data_fingerprint(data_spec(portable_config(cfg)["data"], cfg.columns,
                                                 cfg.max_samples, cfg.seed))
    else:
        data_sha256 = data_fingerprint(spec)
        if saved is not None and saved.get("data_sha256") != data_sha256:
            raise DataError(f"--resume {resume}: {spec} is not the data the run started with "
                            "(its contents differ); point at the original with `edge-tune "
                            f"train --resume {resume} --data PATH` (the checkpoint in "
                            f"{Path(resume) / CHECKPOINT} is kept)")
    if cfg.full and backend not in FULL_BACKENDS:
        raise UsageError(f"--full: full fine-tuning runs on the {' and '.join(FULL_BACKENDS)} "
                         f"backends, not {backend}: add --backend cpu")
    said: list = []  # what reading says waits until the data is known to fit --method
    data, folder_val, data_extra = read_train_data(cfg, said.append)
    check_method(cfg.method, data.format, str(spec))
    for event in said:
        on_event(event)
    records = data.records
    train_records, val_records = split_validation(
        [job_record(r) for r in records], cfg.val_split, cfg.seed,
        [job_record(r) for r in read_data(cfg.val, cfg, on_event).records] if cfg.val else
        [job_record(r) for r in folder_val.records] if folder_val else None)
    ref = models.resolve(cfg.model, on_event)
    template_choice.require_for_conversations(train_records + val_records, ref, chosen)
    if ref.gguf is None and ref.hf_dir is not None and \
            not models.unquantized_hub_id(ref.hub_id or "") and not _prequantized(ref.hf_dir):
        _refuse_unless_llama_cpp_runs(ref, on_event)  # before the training time is spent
    base_sha256 = sha256_file(ref.gguf) if ref.gguf else None  # once: worker and manifest
    replayed = _replay(cfg, ref, base_sha256, chosen, len(train_records), on_event)
    train_records = train_records + replayed  # the loop shuffles; validation stays the user's
    on_event(Log(f"backend: {backend} ({why})"))
    if cfg.dora:
        on_event(Log("--dora: a DoRA adapter has no GGUF LoRA form (llama.cpp has no magnitude "
                     "vectors): this run writes no adapter.gguf; export it with `edge-tune "
                     "export RUN --merge` (one GGUF with the adapter merged, verified)",
                     "warning"))
    run_plan = None
    if resume is None:  # a resumed run keeps the settings it was planned with
        run_plan = fit_plan(cfg, ref, backend, hw, train_records)
        if run_plan is not None:
            check_plan(run_plan)
            on_event(Log(planner_describe(run_plan)))
            cfg = dataclasses.replace(cfg, **{k: getattr(run_plan.config, k) for k in PLANNED})
    data_record = {"path": _data_path(spec), "format": data.format,
                   "sha256": data_sha256,
                   "skipped": len(data.skipped),
                   "ignored_keys": dict(data.ignored.most_common()),
                   "undesirable_left_out": data.undesirable_left_out,
                   "records": len(records),
                   # the system prompt all records shared: chat/serve's default
                   **({"system": shared} if (shared := template_choice.shared_system(records))
                      else {}),
                   "val": str(Path(cfg.val).resolve()) if cfg.val else _one(data_extra, "valid"),
                   "val_records": len(val_records), **data_extra,
                   **({"replay": {"records": len(replayed),
                                  "prompts": "edge_tune/" + REPLAY_SOURCE,
                                  "answers": "the base's own, greedy"}} if replayed else {})}
    # What the manifest needs besides training's result, kept in RUN_CONFIG: a run whose
    # last steps failed is then finished without its data (finish_run).
    finish = {"backend_reason": why, "data": data_record,
              "plan": run_plan.to_dict() if run_plan is not None else None}
    if resume is None:
        existed = Path(cfg.out).exists() if cfg.out else False
        check_space(Path(cfg.out) if cfg.out else Path("runs"), run_plan, cfg)
        if cfg.verify and ref.gguf is not None:
            check_verify_space(ref.gguf, base_sha256)
        run_dir = prepare_run_dir(cfg.out)
        say_leftovers(run_dir, on_event)
        remove_tree(run_dir / CHECKPOINT)  # a stale one from a reused dir
        for folder in ("adapter", "model"):  # nor is its old training to be finished
            (run_dir / folder / TRAINING_RESULT).unlink(missing_ok=True)
        write_text_atomic(run_dir / RUN_CONFIG, json.dumps(
            {"config": portable_config(cfg), "data_sha256": data_sha256,
             "cwd": os.getcwd(), "finish": finish}, indent=2) + "\n")
    else:
        run_dir = Path(resume)
        say_leftovers(run_dir, on_event)
        check_resume_space(run_dir)
        assert saved is not None
        if saved.get("finish") is None or data:  # an older run; or its data moved
            stored = dict(saved["config"], data=portable_config(cfg)["data"]) if data \
                else saved["config"]
            write_text_atomic(run_dir / RUN_CONFIG, json.dumps(
                {**saved, "config": stored, "finish": finish}, indent=2) + "\n")
    ckpt = run_dir / CHECKPOINT
    job = TrainJob.from_dict({  # the wire contract: a key it does not have is an error
        "config": cfg.to_dict(),
        "backend": backend,
        "model_ref": {"spec": ref.spec, "gguf": str(ref.gguf) if ref.gguf else None,
                      "hf_dir": str(ref.hf_dir) if ref.hf_dir else None, "hub_id": ref.hub_id},
        "base_sha256": base_sha256,
        "records": train_records,
        "val_records": val_records,
        "run_dir": str(run_dir),
        "physical_cores": hw.physical_cores,
        "cpu_has_bf16": hw.has_bf16_cpu,
        "resume_from": str(ckpt) if resume is not None and ckpt.is_dir() else None,
        "chat_template": chosen.text if chosen else None,  # replaces the tokenizer's own
    })
    tracker = tracking.Tracker(cfg.report_to, run_dir, cfg.to_dict(), on_event)
    proc = TrainingProcess(job, run_dir, tracker.sink(on_event))
    if cancel is not None:
        def watch() -> None:
            while not cancel.wait(0.2):
                if proc.proc.poll() is not None:
                    return
            proc.cancel()

        threading.Thread(target=watch, daemon=True).start()
    result: Optional[WorkerResult] = None
    try:
        result = proc.wait()
    except EdgeTuneError as exc:
        from edge_tune.errors import ExitCode

        # The worker refused its input (data, tokenizer, model) before training: the run
        # never started, so the folder made for it goes (a crash keeps it: the message names
        # train.log; a reused --out folder stays; so does anything training wrote).
        if resume is None and not existed and exc.exit_code == ExitCode.BAD_INPUT and \
                not ckpt.exists() and not _trained_dir(run_dir, cfg).exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:  # loss.png and the tracker's files, cancelled or not
        try:
            tracker.close(result.losses if result is not None else None)
        except OSError as exc:  # a full disk: loss.png is not worth losing the run over
            on_event(Log(f"{run_dir}: tracker files / loss.png not written ({exc})",
                         "warning"))
    on_event(Log(f"training finished: {_trained_dir(run_dir, cfg)} saved"))
    return _complete(run_dir, cfg, result, ref, chosen, base_sha256, backend, why, finish,
                     on_event)


def portable_config(cfg: TrainConfig) -> dict:
    """``cfg`` as RUN_CONFIG stores it: local paths (data sources, --val, --model,
    --chat-template FILE) made absolute, so that ``--resume`` works from any directory. Hub
    specs and built-in names stay as given."""
    from edge_tune.data.layouts import data_values, parse_spec

    def absolute(text):
        if not text or not Path(str(text)).exists():
            return text
        return str(Path(str(text)).resolve())

    def source(text: str) -> str:
        try:
            spec = parse_spec(text)
        except EdgeTuneError:
            return text
        if spec.hub or not Path(spec.target).exists():
            return text
        return str(Path(spec.target).resolve()) + text[len(spec.target):]  # keeps a *W

    values = cfg.to_dict()
    sources = [source(t) for t in data_values(cfg.data)]
    values["data"] = sources[0] if isinstance(cfg.data, str) and len(sources) == 1 \
        else sources
    values.update(val=absolute(cfg.val), model=absolute(cfg.model),
                  chat_template=absolute(cfg.chat_template))
    return values


def check_space(out: Path, run_plan, cfg: TrainConfig) -> None:
    """DiskFull (exit 2, before any work) when the filesystem of the run folder lacks what
    the run writes there: the plan's outputs, a checkpoint (the trained weights and AdamW's
    two moments) twice while one replaces the other, and for a full run the F32 model
    llama.cpp's converter writes before the F16 one."""
    from edge_tune.fsutil import mib, require_free
    from edge_tune.planner import disk_bytes

    if run_plan is None:  # no shape to size it by (the plan said why)
        return
    need = disk_bytes(run_plan.estimate.output_bytes, cfg.full, bool(cfg.save_every))
    require_free(out, int(need["total"]), "this run (" + ", ".join(
        f"{k} {mib(v)}" for k, v in need.items() if k != "total") + ", not all at once)")


def check_verify_space(base_gguf: Path, sha256: Optional[str]) -> None:
    """DiskFull before training when the cache cannot hold the F32 copy of the base that
    verify writes after it (once per base: ``verify.f32_copy``; 515 MiB for the default
    model), so a run is not refused its check only once training is over."""
    from edge_tune.converters.formats.gguf_header import read_header
    from edge_tune.converters.formats.merge import estimate_bytes
    from edge_tune.fsutil import cache_dir, require_free

    if sha256 and (cache_dir() / "f32" / f"{sha256[:16]}.gguf").exists():
        return
    require_free(cache_dir(), estimate_bytes(read_header(Path(base_gguf)), "F32"),
                 f"the F32 copy of {Path(base_gguf).name} that verify writes after training "
                 "(once; or train with --no-verify)")


def check_resume_space(run_dir: Path) -> None:
    """DiskFull before a resume when the run folder's filesystem cannot hold another
    checkpoint beside the one there (written on cancel, or every --save-every steps) plus
    the adapter and its GGUF."""
    from edge_tune.training.checkpoint import CHECKPOINT
    from edge_tune.fsutil import require_free, tree_bytes

    ckpt = tree_bytes(run_dir / CHECKPOINT)
    weights = tree_bytes(run_dir / CHECKPOINT / "adapter.safetensors")
    require_free(run_dir, ckpt + 2 * weights, f"resuming {run_dir} (a new checkpoint "
                 "beside the old one, the adapter and its GGUF)")


# what a run folder's atomic writes are named after (their temps: fsutil.sweep_leftovers)
RUN_FILES = ("adapter", "model", "checkpoint", "adapter.gguf", FULL_MODEL_GGUF,
             manifest_mod.MANIFEST, RUN_CONFIG, "loss.png")


def say_leftovers(folder: Path, on_event: EventSink) -> None:
    """Remove what killed edge-tune processes left in ``folder`` (temp folders named with
    their pid), in one line."""
    from edge_tune.fsutil import leftovers_line

    from edge_tune.training.checkpoint import CHECKPOINT
    from edge_tune.fsutil import tree_bytes

    removed = sweep_leftovers(folder, legacy=RUN_FILES)
    ckpt = Path(folder) / CHECKPOINT
    # a finished run's checkpoint that a kill left half-deleted (older versions deleted it
    # file by file): it can resume nothing
    if (Path(folder) / manifest_mod.MANIFEST).is_file() and ckpt.is_dir() and \
            not (ckpt / "state.json").is_file():
        size = tree_bytes(ckpt)
        remove_tree(ckpt)
        removed.append((ckpt, size))
    if removed:
        on_event(Log(leftovers_line(removed)))


def _trained_dir(run_dir: Path, cfg: TrainConfig) -> Path:
    return Path(run_dir) / ("model" if cfg.full else "adapter")


def training_finished(run_dir: Path) -> bool:
    """True when training of ``run_dir`` finished (its adapter, or a full run's model, is
    saved with the training result) but the run was not completed (no manifest: its GGUF
    export or manifest write failed, or the process was killed)."""
    return finished_training(run_dir) is not None


def export_run(adapter: Path, *args, **kwargs):
    """:func:`edge_tune.commands.export.export` (same arguments and result), after finishing
    a run whose training finished but whose GGUF or manifest was not written (disk full,
    killed: :func:`finish_run`, without verify), so ``export RUN`` works from what is there."""
    import inspect

    given = inspect.signature(export).bind(adapter, *args, **kwargs).arguments
    if Path(adapter).is_dir() and training_finished(Path(adapter)):
        finish_run(Path(adapter), given.get("on_event", ignore), verify=False)
    elif (Path(adapter) / RUN_CONFIG).is_file():  # a run: what killed commands left in it
        say_leftovers(Path(adapter), given.get("on_event", ignore))
    out = given.get("out") or given.get("ollama") or given.get("vllm") or adapter
    with disk_full_says(Path(out), f"nothing was left at the output name and {adapter} is "
                        "unchanged: free space and export again"):
        return export(adapter, *args, **kwargs)


# export's own parameters, for callers that read them (tests/test_tui_core_protocol.py checks
# api.export against the TUI's core Protocol)
export_run.__signature__ = inspect.signature(export)


def finish_run(run_dir: Path, on_event: EventSink = ignore, verify: bool = True
               ) -> TrainResult:
    """Complete a run whose training finished (:func:`training_finished`) from what it saved:
    the GGUF export, the manifest and (``verify``) the check. Needs neither the data nor
    training again. Raises EdgeTuneError when the run has no finished training."""
    from edge_tune.training.worker import TRAINING_RESULT

    run_dir = Path(run_dir)
    if not training_finished(run_dir):
        raise EdgeTuneError(f"{run_dir}: no finished training to complete")
    cfg, saved = load_run_config(run_dir, check_data=False)
    if not verify:
        cfg = dataclasses.replace(cfg, verify=False)
    say_leftovers(run_dir, on_event)
    saved_result = _trained_dir(run_dir, cfg) / TRAINING_RESULT
    result = json.loads(saved_result.read_text())
    backend = result.pop("backend", None) or cfg.backend
    result = WorkerResult.from_dict(result, str(saved_result))
    finish = saved.get("finish") or {}
    on_event(Log(f"{run_dir}: training had finished ({result.steps} steps); writing "
                 "what is missing (GGUF, manifest)"))
    ref = models.resolve(cfg.model, on_event)
    chosen = template_choice.given(cfg.chat_template)
    base_sha256 = sha256_file(ref.gguf) if ref.gguf else None
    return _complete(run_dir, cfg, result, ref, chosen, base_sha256, backend,
                     finish.get("backend_reason", ""), finish, on_event)


def _complete(run_dir: Path, cfg: TrainConfig, result: WorkerResult, ref: models.ModelRef,
              chosen,
              base_sha256: Optional[str], backend: str, why: str, finish: dict,
              on_event: EventSink) -> TrainResult:
    """After training: the GGUF (adapter or full model), the manifest, then verify. The
    trained adapter (model) is already saved with its result, so the checkpoint goes first
    (it is 3x the adapter's size) and a failure here keeps what training made."""
    from edge_tune.training.checkpoint import CHECKPOINT

    trained = _trained_dir(run_dir, cfg)
    remove_tree(run_dir / CHECKPOINT)  # finished: the adapter is the result

    def kept() -> str:
        if (run_dir / manifest_mod.MANIFEST).is_file():  # only verify was left
            return (f"the run is complete ({run_dir / manifest_mod.MANIFEST}); free space, then "
                    f"`edge-tune verify {run_dir}` checks it")
        return (f"kept: the trained {'model' if cfg.full else 'adapter'} in {trained}: free "
                f"space, then `edge-tune train --resume {run_dir}` (or `edge-tune export "
                f"{run_dir}`) finishes the run without training again")

    with disk_full_says(run_dir, kept):
        return _write_outputs(run_dir, cfg, result, ref, chosen, base_sha256, backend, why,
                              finish, on_event)


def _write_outputs(run_dir: Path, cfg: TrainConfig, result: WorkerResult, ref: models.ModelRef,
                   chosen, base_sha256: Optional[str], backend: str, why: str, finish: dict,
                   on_event: EventSink) -> TrainResult:
    tokenizer_info = _template_record(result.tokenizer, chosen)
    base = _base_record(ref, result.hf_dir, base_sha256)
    adapter_info: dict = {} if cfg.full else {"peft": "adapter"}
    if result.mlx_adapter:
        adapter_info["mlx"] = result.mlx_adapter  # the native mlx-lm adapter dir
    # the manifest's result: training's figures (the rest went to the sections above)
    figures = {k: v for k, v in result.to_dict().items()
               if k not in ("tokenizer", "hf_dir", "mlx_adapter")}
    not_runnable = None  # why llama.cpp cannot run this model (its converter's reason)
    try:
        base_gguf = ref.gguf or _converted_base(base, on_event)  # HF weights: cached convert
    except EdgeTuneError as exc:
        base_gguf, not_runnable = None, exc.message
    model_info = None
    if cfg.full:  # the trained weights, converted by llama.cpp's converter (verified below)
        from edge_tune.commands.export import export_full

        # checked below, once the manifest (which verify reads) is written
        shipped = export_full(run_dir, manifest_mod.Manifest(kind="full"),
                              run_dir / FULL_MODEL_GGUF, "F16", on_event, vocab_from=ref.gguf,
                              verify=False, checked_later=True)
        model_info = {"hf": "model", "gguf": FULL_MODEL_GGUF, "quant": shipped.quant}
    elif base_gguf is not None and not cfg.dora:
        exported = export(run_dir / "adapter", base=base_gguf, out=run_dir / "adapter.gguf",
                          on_event=on_event, _base_sha256=base["sha256"], verify=False)
        adapter_info.update(gguf="adapter.gguf", alpha=exported.alpha, rank=exported.rank)
    man = manifest_mod.build(
        config=cfg.to_dict(), backend=backend, backend_reason=why, base=base,
        data={**(finish.get("data") or {}), "examples": result.examples},
        result=figures, tokenizer=tokenizer_info, adapter=adapter_info,
        plan=finish.get("plan"), kind="full" if cfg.full else "lora", model=model_info)
    manifest_mod.write(run_dir, man)
    if cfg.full:
        if cfg.verify and base_gguf is not None:
            # converts to F32 again (the exact check needs it; seconds for small models)
            _check_full_model(run_dir, on_event)
    elif cfg.dora and base_gguf is not None:
        on_event(Log(f"DoRA: no adapter.gguf; `edge-tune export {run_dir} --merge` writes the "
                     "merged GGUF and verifies it", "warning"))
    elif cfg.verify and base_gguf is not None:
        if _prequantized(Path(base["hf_dir"])):  # verify's torch side cannot load bnb weights
            on_event(Log("verify: skipped (trained on pre-quantized 4-bit weights); run "
                         f"`edge-tune verify {run_dir} --base {base_gguf}`", "warning"))
        else:
            verify_hook(run_dir, None, on_event)  # llama.cpp runs what was trained, or exit 1
    if not_runnable is not None:  # the run's result cannot be used where edge-tune runs it
        trained = run_dir / ("model" if cfg.full else "adapter")
        raise CheckFailed(f"{run_dir}: trained ({'weights' if cfg.full else 'PEFT adapter'} in "
                          f"{trained}), but llama.cpp cannot run this model, so there is no "
                          f"GGUF to chat with: {not_runnable}")
    on_event(Done("train", {"run_dir": str(run_dir)}))
    return TrainResult(run_dir, man)


def _replay(cfg: TrainConfig, ref: models.ModelRef, base_sha256: Optional[str], chosen,
            n_train: int, on_event: EventSink) -> list:
    """``--replay N``: N job records of the base's own answers to the shipped general
    prompts (:mod:`edge_tune.replay`), generated in llama.cpp (the base's GGUF, or its cached
    conversion) with the run's template and system mode; [] without ``--replay``."""
    if not cfg.replay:
        return []
    from edge_tune.replay import replay_records

    probe_record = [{"messages": [{"role": "user", "content": "?"}]}]
    template_choice.require_for_conversations(probe_record, ref, chosen)
    base_gguf = ref.gguf
    if base_gguf is None:  # HF weights: the GGUF training's end uses too (converted once)
        source = models.unquantized_hub_id(ref.hub_id or "")  # bnb-4bit: its unquantized repo
        hf_dir = models.hf_dir_for(models.resolve(source, on_event) if source else ref,
                                   on_event)
        base_gguf = _cached_gguf_base(hf_dir, source, bool(source or ref.hub_id), on_event)
    records = replay_records(base_gguf, cfg.replay, base_sha256 or sha256_file(base_gguf),
                             chosen.text if chosen else None, cfg.system_mode, on_event)
    on_event(Log(f"replay: {len(records)} general records (the base's own answers to "
                 f"edge-tune's general prompts) mixed into the {n_train} training records, to "
                 "keep the base's behaviour outside your task"))
    return records


def _data_path(spec) -> str:
    """The manifest's ``data.path``: the one source's absolute path (a hub spec as given), or
    every source's spec joined with `` + `` when several are mixed."""
    if len(spec.specs) == 1 and not spec.specs[0].hub and spec.specs[0].text == \
            spec.specs[0].target:
        return str(Path(spec.specs[0].target).resolve())
    return str(spec)


def _one(extra: dict, role: str):
    """The single file of ``role`` (absolute), for the manifest's ``val``; None otherwise."""
    found = (extra.get("files") or {}).get(role) or []
    return str(Path(found[0]).resolve()) if len(found) == 1 and Path(found[0]).is_file() \
        else None


def _template_record(tokenizer_info: dict, chosen) -> dict:
    """The manifest's template fields: the text the data was rendered with, its built-in
    name, where it came from, and the stop tokens (the template's end of turn included)."""
    from edge_tune.templates.builtin import EOS, template_name

    info = dict(tokenizer_info)
    name = template_name(info.get("chat_template") or "")
    info.update(chat_template_name=name,
                chat_template_source="--chat-template" if chosen else "model")
    if name and EOS[name] not in info.get("stop_tokens", []):
        info["stop_tokens"] = [*info.get("stop_tokens", []), EOS[name]]
    return info


def _base_record(ref: models.ModelRef, hf_dir: str, sha256: Optional[str]) -> dict:
    rec: dict = {"spec": ref.spec, "hf_dir": hf_dir}
    if ref.gguf is not None:
        from edge_tune.converters.formats.base_info import from_gguf

        info = from_gguf(ref.gguf)
        rec.update(gguf=str(ref.gguf), sha256=sha256, arch=info.arch,
                   name=info.metadata.get("name", ""), gguf_source="given")
        if ref.ollama:  # read from Ollama's store: a Modelfile can name it (FROM NAME)
            rec["ollama"] = ref.ollama
    else:
        from edge_tune.converters.formats.base_info import from_hf_dir

        rec.update(gguf=None, sha256=None, arch=from_hf_dir(Path(hf_dir)).arch,
                   hub_id=ref.hub_id)
        if ref.hub_id and models.unquantized_hub_id(ref.hub_id):
            rec["unquantized_hub_id"] = models.unquantized_hub_id(ref.hub_id)
    return rec


def _prequantized(hf_dir: Path) -> bool:
    try:
        return "quantization_config" in json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _refuse_unless_llama_cpp_runs(ref: models.ModelRef, on_event: EventSink) -> None:
    """Convert a local HF model for llama.cpp now (cached; training's end reuses the file), so
    a model llama.cpp's converter rejects is refused before training, in one line (DataError)
    naming the converter's reason, not after it with an adapter nothing here can run."""
    assert ref.hf_dir is not None
    try:
        _cached_gguf_base(ref.hf_dir, None, bool(ref.hub_id), on_event)
    except EdgeTuneError as exc:
        mismatch = _tokenizer_beyond_vocab(ref.hf_dir)
        if mismatch:
            raise DataError(mismatch) from None
        raise DataError(f"--model {ref.spec}: llama.cpp cannot run this model, so an adapter "
                        f"trained on it could not be chatted with, served or verified here "
                        f"(nothing trained): {exc.message}") from None


def _tokenizer_beyond_vocab(hf_dir: Path) -> Optional[str]:
    """Why llama.cpp's converter rejected ``hf_dir`` when its tokenizer has more tokens than
    the model's embedding has rows (the converter only asserts), else None."""
    try:
        config = json.loads((hf_dir / "config.json").read_text())
        from transformers import AutoTokenizer

        size = len(AutoTokenizer.from_pretrained(str(hf_dir)))
    except Exception:  # noqa: BLE001 - no better reason than the converter's own
        return None
    vocab = (config.get("text_config") or config).get("vocab_size")
    if not isinstance(vocab, int) or size <= vocab:
        return None
    return (f"{hf_dir / 'config.json'}: vocab_size: {vocab} is smaller than the tokenizer, "
            f"which has {size} tokens (expected a tokenizer that matches the model's "
            "embedding: llama.cpp's converter refuses this model, and a token id past "
            "vocab_size would stop training)")


def _cached_gguf_base(hf_dir: Path, source: Optional[str], fetch: bool,
                      on_event: EventSink) -> Path:
    """The f16 GGUF of ``hf_dir`` made by llama.cpp's converter, once, in the cache (keyed by
    the weights' content). Raises EdgeTuneError (one line) when the converter rejects it."""
    from edge_tune.converters.integrations import hf_to_gguf
    from edge_tune.fsutil import cache_dir

    out = cache_dir() / "gguf" / f"{models.hf_content_key(hf_dir)[:16]}-f16.gguf"
    if not out.is_file():
        check_llama_cpp_computes_as_hf(hf_dir)
        on_event(Log(f"no GGUF base for this model: converting {source or hf_dir} with "
                     f"llama.cpp's converter (once; cached as {out})"))
        hf_to_gguf.convert(hf_dir, out, "f16", on_event, fetch=fetch)
        write_text_atomic(out.with_name(out.name + ".sha256"), sha256_file(out))
    return out


def _converted_base(base: dict, on_event: EventSink) -> Path:
    """A GGUF base for a model given as HF weights (:func:`_cached_gguf_base`), recorded in
    ``base`` (the manifest's record). A pre-quantized ``unsloth/*-bnb-4bit`` model is converted
    from the unquantized repo it maps to. Raises EdgeTuneError with the converter's reason when
    llama.cpp cannot run the model."""
    source = base.get("unquantized_hub_id")
    hf_dir = models.hf_dir_for(models.resolve(source, on_event), on_event) if source \
        else Path(base["hf_dir"])
    out = _cached_gguf_base(hf_dir, source, bool(source or base.get("hub_id")), on_event)
    digest = out.with_name(out.name + ".sha256")
    base.update(gguf=str(out), gguf_source="converted", gguf_from=source or str(hf_dir),
                sha256=digest.read_text().strip() if digest.is_file() else sha256_file(out))
    return out


def _check_full_model(run_dir: Path, on_event: EventSink) -> None:
    """verify a full run's model GGUF; one that fails does not keep its name (it moves to
    ``model.rejected.gguf``, the reason beside it), as every exported model."""
    from edge_tune.commands.export import reject

    model = run_dir / FULL_MODEL_GGUF
    report = verify_hook(run_dir, None, on_event, merged=model, raise_on_fail=False)
    if not report.ok:
        reason = f"{report.summary}: out of tolerance: {'; '.join(report.failures)}"
        raise CheckFailed(f"{model.name}: {reason}; {reject(model, model, reason)}")
