"""Run directories on disk: where a new run goes, what a run holds, and what can be done with
one (list, delete, resume).

A run directory holds ``train_config.json`` (:data:`RUN_CONFIG`, written when training starts)
and, once finished, ``manifest.json`` (:mod:`edge_tune.manifest`); a cancelled run keeps its
checkpoint (:mod:`edge_tune.training.checkpoint`).
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from edge_tune import manifest as manifest_mod
from edge_tune.config import TrainConfig
from edge_tune.errors import EdgeTuneError

if TYPE_CHECKING:
    from edge_tune.training.job import WorkerResult

RUN_CONFIG = "train_config.json"  # the run's settings, written when it starts (for --resume)


def default_run_dir() -> Path:
    """``runs/run-YYYYmmdd-HHMMSS`` (local time), relative to the working directory."""
    return Path("runs") / _dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")


def prepare_run_dir(out: Optional[str]) -> Path:
    """Create the directory a new run writes into (``--out``, else :func:`default_run_dir`).
    Raises EdgeTuneError for a file, or a non-empty directory that is not an edge-tune run."""
    run_dir = Path(out) if out else default_run_dir()
    if run_dir.exists() and not run_dir.is_dir():
        raise EdgeTuneError(f"--out {run_dir}: exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()) and \
            not (run_dir / manifest_mod.MANIFEST).exists() and \
            not (run_dir / RUN_CONFIG).exists():  # a cancelled run: starting again is fine
        raise EdgeTuneError(f"--out {run_dir}: directory is not empty and is not an edge-tune "
                            "run; choose another --out")
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
        raise EdgeTuneError(f"--resume {run_dir}: not a run directory that can be resumed "
                            f"(no {RUN_CONFIG})")
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgeTuneError(f"{path}: unreadable ({exc})") from None
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
                f"--resume {run_dir}: the run's training data {missing[0]} is not there (the "
                f"run was started in {started}); put it back, or point at where it is now "
                f"with `edge-tune train --resume {run_dir} --data PATH` (checked against the "
                f"data's sha256; the checkpoint is kept)")
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
        raise EdgeTuneError(f"{run_dir}: not an edge-tune run directory; not deleting it")
    shutil.rmtree(run_dir)
