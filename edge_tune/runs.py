"""Run directories on disk: where a new run goes, what a run holds, and what can be done with
one (list, delete, resume); before a run trains, its settings checked (:func:`preflight`) and
its directory opened (:func:`open_run`).

A run directory holds ``train_config.json`` (:data:`RUN_CONFIG`, written when training starts)
and, once finished, ``manifest.json`` (:mod:`edge_tune.manifest`); a cancelled run keeps its
checkpoint (:mod:`edge_tune.training.checkpoint`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from edge_tune import manifest as manifest_mod
from edge_tune.config import TrainConfig
from edge_tune.errors import EdgeTuneError, UsageError
from edge_tune.events import EventSink, Log
from edge_tune.hardware import Hardware

if TYPE_CHECKING:
    from edge_tune.training.job import WorkerResult
    from edge_tune.templates.choice import ChatTemplate

RUN_CONFIG = "train_config.json"  # the run's settings, written when it starts (for --resume)


def default_run_dir() -> Path:
    """``runs/run-YYYYmmdd-HHMMSS`` (local time), relative to the working directory."""
    return Path("runs") / _dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")


def prepare_run_dir(out: Optional[str]) -> Path:
    """Create the directory a new run writes into (``--out``, else :func:`default_run_dir`).
    Raises EdgeTuneError for a file, or a non-empty directory that is not an edge-tune run."""
    run_dir = Path(out) if out else default_run_dir()
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError("exists and is not a directory",
                         setting="out", value=run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()) and \
            not (run_dir / manifest_mod.MANIFEST).exists() and \
            not (run_dir / RUN_CONFIG).exists():  # a cancelled run: starting again is fine
        raise UsageError("directory is not empty and is not an edge-tune "
                         "run; choose another --out", setting="out", value=run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def load_run_config(run_dir: Path, data: Optional[list] = None,
                    check_data: bool = True) -> tuple[TrainConfig, dict]:
    """(config, saved record) of a run started by ``train``; for ``--resume``.

    ``data``: where the run's training data is now (``--resume RUN --data PATH``), in place of
    the stored sources. A stored relative path (runs started before paths were stored
    absolute) is looked up from the working directory, then from the directory the run was
    started in (stored, else the one above ``runs/``). ``check_data``: raise DataError, naming
    the file and how to point at it, when a local data file is not found."""
    from edge_tune.config import build
    from edge_tune.errors import DataError

    run_dir = Path(run_dir)
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        raise UsageError("not a run directory that can be resumed "
                         f"(no {RUN_CONFIG})", setting="resume", value=run_dir)
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    values = dict(saved["config"], out=str(run_dir))
    started = Path(saved["cwd"]) if saved.get("cwd") else run_dir.resolve().parent.parent
    for key in ("val", "model", "chat_template"):
        values[key] = _found(values.get(key), started)
    if data:
        values["data"] = data if len(data) > 1 else data[0]
    else:
        sources = [_found(t, started) for t in _sources(values.get("data"))]
        values["data"] = sources if isinstance(values.get("data"), list) else \
            (sources[0] if sources else values.get("data"))
        missing = [t for t in sources if _local_missing(t)]
        if check_data and missing:
            raise DataError(
                f"the run's training data {missing[0]} is not there (the "
                f"run was started in {started}); put it back, or point at where it is now "
                f"with `edge-tune train --resume {run_dir} --data PATH` (checked against the "
                f"data's sha256; the checkpoint is kept)", setting="resume", value=run_dir)
    return build(None, **{k: v for k, v in values.items() if v is not None}), saved


def _sources(data) -> list[str]:
    if isinstance(data, (list, tuple)):
        return [str(d) for d in data]
    return [str(data)] if data else []


def _found(text, started: Path):
    """``text`` when it is not a relative path, or it exists from here; else the same path
    under ``started`` when it exists there (a run's spec stored relative)."""
    if not text or Path(str(text)).is_absolute() or Path(str(text)).exists():
        return text
    head, star, weight = str(text).partition("*")  # SOURCE*W keeps its weight
    for candidate in (started / str(text), started / head):
        if candidate.exists():
            return str(candidate) + (star + weight if candidate == started / head and star
                                     else "")
    return text


def _local_missing(text: str) -> bool:
    """A spec that names a local file or folder (absolute, or ./ ../ relative, or a data
    file's extension) that does not exist; hub IDs are never "missing" here."""
    head = str(text).split("*")[0].split("@")[0]
    if Path(head).exists() or Path(str(text)).exists():
        return False
    return Path(head).is_absolute() or head.startswith(("./", "../", "~")) or \
        Path(head).suffix.lower() in (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt",
                                      ".arrow", ".gz")


def resume_state(run_dir: Path) -> Optional[dict]:
    """Where a cancelled run stands: ``{"step", "total", "checkpoint"}``, or None when it
    cannot be resumed (finished, or never started). ``"finished": True`` when training ended
    but the run's last steps (GGUF, manifest) did not: resuming completes it."""
    from edge_tune.training.checkpoint import read_state

    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG).is_file():
        return None
    done = finished_training(run_dir)
    if done is not None:  # trained; its GGUF or manifest is missing: resume finishes it
        return {"step": done.steps, "total": done.steps, "checkpoint": False,
                "finished": True}
    state = read_state(run_dir)
    if state is None:
        if (run_dir / manifest_mod.MANIFEST).is_file():
            return None
        return {"step": 0, "total": None, "checkpoint": False}  # cancelled before step 1
    return {"step": state["step"], "total": state["total"], "checkpoint": True}


def finished_training(run_dir: Path) -> Optional[WorkerResult]:
    """The saved training result of a run whose training ended but which has no manifest
    (its GGUF export or manifest write failed, or it was killed then); None otherwise (also
    for a file that cannot be read as one)."""
    from edge_tune.training.job import WorkerResult
    from edge_tune.training.worker import TRAINING_RESULT

    if (Path(run_dir) / manifest_mod.MANIFEST).exists():
        return None
    for folder in ("adapter", "model"):
        path = Path(run_dir) / folder / TRAINING_RESULT
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
                saved.pop("backend", None)  # the file's own key, beside the result's
                return WorkerResult.from_dict(saved, str(path))
            except (OSError, json.JSONDecodeError, AttributeError, EdgeTuneError):
                return None
    return None


def run_summary(run_dir: Path) -> Optional[dict]:
    """One row of :func:`list_runs` (status ``done`` or ``cancelled``), or None when
    ``run_dir`` is not an edge-tune run."""
    from edge_tune.training.checkpoint import read_state

    man = manifest_mod.read(run_dir)
    saved_path = run_dir / RUN_CONFIG
    if man is None and not saved_path.is_file():
        return None
    row: dict = {"path": str(run_dir), "name": run_dir.name}
    if man is not None:
        res = man.result
        gguf = man.adapter.gguf
        row.update(status="done", created=man.created, step=res.steps,
                   total=res.steps, final_loss=res.final_loss,
                   val_loss=res.val_loss, tokens_per_second=res.tokens_per_second,
                   train_seconds=res.train_seconds,
                   base=man.base.name or man.base.spec,
                   data=man.data.path,
                   adapter_gguf=str(run_dir / gguf) if gguf and (run_dir / gguf).is_file()
                   else None, hyperparameters=man.hyperparameters.to_dict())
        return row
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, json.JSONDecodeError):
        saved = {}
    state = read_state(run_dir)
    if state is None and (done := finished_training(run_dir)) is not None:
        # trained, not yet completed
        state = {"step": done.steps, "total": done.steps, "losses": done.losses,
                 "val_loss": done.val_loss, "train_seconds": done.train_seconds}
    losses = (state or {}).get("losses") or []
    row.update(status="cancelled", created=None, step=(state or {}).get("step", 0),
               total=(state or {}).get("total"), final_loss=losses[-1] if losses else None,
               val_loss=(state or {}).get("val_loss"), tokens_per_second=None,
               train_seconds=(state or {}).get("train_seconds"), base=None,
               data=saved.get("config", {}).get("data"), adapter_gguf=None,
               hyperparameters=saved.get("config", {}))
    return row


def list_runs(root: Path = Path("runs")) -> list[dict]:
    """The runs under ``root`` (finished and cancelled), newest first, with their metrics
    from ``manifest.json`` (or the checkpoint of a cancelled run)."""
    root = Path(root)
    if not root.is_dir():
        return []
    rows = [r for d in root.iterdir() if d.is_dir() for r in [run_summary(d)] if r]
    return sorted(rows, key=lambda r: (r.get("created") or "", r["name"]), reverse=True)


def delete_run(run_dir: Path) -> None:
    """Remove a run directory; refuses anything that is not an edge-tune run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or run_summary(run_dir) is None:
        raise UsageError(f"{run_dir}: not an edge-tune run directory; not deleting it")
    shutil.rmtree(run_dir)


# --- a run about to train: its settings checked, its directory opened -------------------------

FULL_MODEL_GGUF = "model.gguf"  # a full run's model as llama.cpp runs it (F16)
# what a run folder's atomic writes are named after (their temps: fsutil.sweep_leftovers)
RUN_FILES = ("adapter", "model", "checkpoint", "adapter.gguf", FULL_MODEL_GGUF,
             manifest_mod.MANIFEST, RUN_CONFIG, "loss.png")


def trained_dir(run_dir: Path, full: bool) -> Path:
    """Where training saves its result: ``RUN/model`` for a full fine-tune, else
    ``RUN/adapter``."""
    return Path(run_dir) / ("model" if full else "adapter")


def training_finished(run_dir: Path) -> bool:
    """True when training of ``run_dir`` finished (its adapter, or a full run's model, is
    saved with the training result) but the run was not completed (no manifest: its GGUF
    export or manifest write failed, or the process was killed)."""
    return finished_training(run_dir) is not None


def say_leftovers(folder: Path, on_event: EventSink) -> None:
    """Remove what killed edge-tune processes left in ``folder`` (temp folders named with
    their pid), in one line."""
    from edge_tune.training.checkpoint import CHECKPOINT
    from edge_tune.fsutil import leftovers_line, remove_tree, sweep_leftovers, tree_bytes

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


@dataclass
class Preflight:
    """A run's settings, checked before any heavy work: ``cfg`` (a resumed run's own),
    ``resume`` (the run directory continued, or None), ``saved`` (its RUN_CONFIG record),
    ``data_moved`` (``--resume RUN --data PATH`` given), ``spec`` (the data as named, a
    ``DataSpec``), ``chosen`` (``--chat-template``, or None), ``hw`` (this machine),
    ``backend`` and ``why`` it was chosen, ``data_sha256`` (the data's fingerprint)."""
    cfg: TrainConfig
    resume: Optional[Path]
    saved: Optional[dict]
    data_moved: bool
    spec: Any
    chosen: Optional[ChatTemplate]
    hw: Hardware
    backend: str
    why: str
    data_sha256: Optional[str]


def preflight(cfg: Optional[TrainConfig], resume: Optional[Path], data: Optional[list],
              hw: Hardware) -> Preflight:
    """Check a run's settings before any download or heavy work, each refusal one line: the
    ``--resume`` directory and its saved config (``cfg`` must then be None; ``data``: where
    its data is now), the data spec, ``--model``, ``--chat-template``, ``--report-to``, the
    backend (:func:`edge_tune.training.registry.refuse_unsupported` on ``hw``), and for a
    resume the data's sha256 against the one it started with (DataError)."""
    from edge_tune import models, tracking
    from edge_tune.training import registry
    from edge_tune.data.layouts import data_spec
    from edge_tune.errors import UsageError
    from edge_tune.templates import choice as template_choice

    saved = None
    if resume is not None:
        if cfg is not None:
            raise UsageError("continues a run with its own settings; give no other training "
                             "options", setting="resume")
        if resume_state(resume) is None:
            raise UsageError("nothing to resume (the run finished or "
                             f"has no {RUN_CONFIG})", setting="resume", value=resume)
        cfg, saved = load_run_config(resume, data)
    elif data is not None:
        raise UsageError("--data with --resume only: give it in the run's settings")
    assert cfg is not None
    spec = data_spec(cfg.data, cfg.columns, cfg.max_samples, cfg.seed)  # bad specs: one line
    models.check_spec(cfg.model)  # bad input fails fast, before any download or heavy work
    chosen = template_choice.given(cfg.chat_template)
    tracking.check(cfg.report_to)  # a tracker that is not installed: one line, first
    backend, why = registry.choose(cfg.backend, hw)  # an unusable backend: one line, first
    registry.refuse_unsupported(backend, cfg, hw, resume)
    return Preflight(cfg, Path(resume) if resume is not None else None, saved, bool(data), spec,
                     chosen, hw, backend, why, _data_sha256(cfg, spec, resume, saved))


def _data_sha256(cfg: TrainConfig, spec, resume: Optional[Path], saved: Optional[dict]):
    """The data's fingerprint (one file: its sha256; folders, mixes: all parts), hashed once:
    a new run's as stored (absolute paths: what a resume compares), a resumed one's as found
    now, which must be the one it started with (DataError, the checkpoint kept)."""
    from edge_tune.training.checkpoint import CHECKPOINT
    from edge_tune.data.layouts import data_spec
    from edge_tune.data.readers import data_fingerprint
    from edge_tune.errors import DataError

    if resume is None:
        return data_fingerprint(data_spec(portable_config(cfg)["data"], cfg.columns,
                                          cfg.max_samples, cfg.seed))
    found = data_fingerprint(spec)
    if saved is not None and saved.get("data_sha256") != found:
        raise DataError(f"{spec} is not the data the run started with "
                        "(its contents differ); point at the original with `edge-tune "
                        f"train --resume {resume} --data PATH` (the checkpoint in "
                        f"{Path(resume) / CHECKPOINT} is kept)", setting="resume", value=resume)
    return found


@dataclass
class OpenRun:
    """The directory a run trains in: ``dir``; ``made``: True when this run created it, so a
    run refused before training removes it again; ``checkpoint``: the checkpoint a resumed
    run continues from (None: training starts at step 0)."""
    dir: Path
    made: bool
    checkpoint: Optional[Path] = None


def open_run(pre: Preflight, cfg: TrainConfig, run_plan, base_gguf: Optional[Path],
             base_sha256: Optional[str], finish: dict, on_event: EventSink) -> OpenRun:
    """The run's directory, ready to train in. A new run: DiskFull (exit 2) unless its
    filesystem holds what the run writes (``run_plan``'s outputs) and the cache verify's F32
    copy of ``base_gguf``; then the directory (``cfg.out``, :func:`prepare_run_dir`) cleared
    of an earlier run's checkpoint and result, and RUN_CONFIG written (``cfg``, the data's
    sha256, ``finish``: what completing the run needs besides training's result). A resumed
    run: its leftovers swept, space for another checkpoint checked, RUN_CONFIG brought up to
    date (an older run's, or ``--data`` moved)."""
    from edge_tune.training.checkpoint import CHECKPOINT
    from edge_tune.training.worker import TRAINING_RESULT
    from edge_tune.fsutil import remove_tree, write_text_atomic

    if pre.resume is not None:
        run_dir = pre.resume
        say_leftovers(run_dir, on_event)
        check_resume_space(run_dir)
        assert pre.saved is not None
        if pre.saved.get("finish") is None or pre.data_moved:  # an older run; or data moved
            stored = dict(pre.saved["config"], data=portable_config(cfg)["data"]) \
                if pre.data_moved else pre.saved["config"]
            write_text_atomic(run_dir / RUN_CONFIG, json.dumps(
                {**pre.saved, "config": stored, "finish": finish}, indent=2) + "\n")
        ckpt = run_dir / CHECKPOINT
        return OpenRun(run_dir, made=False, checkpoint=ckpt if ckpt.is_dir() else None)
    existed = Path(cfg.out).exists() if cfg.out else False
    check_space(Path(cfg.out) if cfg.out else Path("runs"), run_plan, cfg)
    if cfg.verify and base_gguf is not None:
        check_verify_space(base_gguf, base_sha256)
    run_dir = prepare_run_dir(cfg.out)
    say_leftovers(run_dir, on_event)
    remove_tree(run_dir / CHECKPOINT)  # a stale one from a reused dir
    for kept in run_dir.glob(f"{manifest_mod.KEPT_PREFIX}*"):  # and its kept checkpoints
        remove_tree(kept)
    for folder in ("adapter", "model"):  # nor is its old training to be finished
        (run_dir / folder / TRAINING_RESULT).unlink(missing_ok=True)
    write_text_atomic(run_dir / RUN_CONFIG, json.dumps(
        {"config": portable_config(cfg), "data_sha256": pre.data_sha256,
         "cwd": os.getcwd(), "finish": finish}, indent=2) + "\n")
    return OpenRun(run_dir, made=not existed)


@contextlib.contextmanager
def removed_if_refused(run: OpenRun, full: bool):
    """Around training: when the worker refuses its input (data, tokenizer, model: exit code
    BAD_INPUT) before training, the run never started, so the folder made for it goes. A
    crash keeps it (the message names train.log); so does a reused ``--out`` folder and
    anything training wrote (a checkpoint, the trained folder)."""
    from edge_tune.training.checkpoint import CHECKPOINT
    from edge_tune.errors import ExitCode

    try:
        yield
    except EdgeTuneError as exc:
        if run.made and exc.exit_code == ExitCode.BAD_INPUT and \
                not (run.dir / CHECKPOINT).exists() and not trained_dir(run.dir, full).exists():
            shutil.rmtree(run.dir, ignore_errors=True)
        raise


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
