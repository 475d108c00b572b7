"""Resumable training: a checkpoint in safetensors + JSON (never pickle), and a safe SIGTERM.

A checkpoint is a directory ``RUN/checkpoint/`` written all-or-nothing:

* ``adapter.safetensors``: the trainable (LoRA) parameters by name;
* ``optimizer.safetensors``: every tensor of the optimizer state (``state.<i>.<key>``) and
  torch's RNG state;
* ``state.json``: the step, the total steps, the optimizer's scalars and param groups, the
  Python RNG state and the batches left in the current epoch (the data order), the running
  counters (tokens, losses, training seconds), and the validation loss so far.

The learning-rate schedule is a pure function of the step (``loop.lr_at``), so the step is its
whole state. torch and safetensors are imported inside functions.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from edge_tune.errors import Cancelled, DataError, EdgeTuneError
from edge_tune.events import Log
from edge_tune.fsutil import atomic_path
from edge_tune.manifest import KEPT_ADAPTER, KEPT_INFO, KEPT_PREFIX

CHECKPOINT = "checkpoint"
FORMAT = "edge-tune-checkpoint/1"


class Interrupted(KeyboardInterrupt):
    """Raised in the training loop when SIGTERM arrives (a KeyboardInterrupt, so that no
    library's ``except Exception`` swallows it); :func:`saved_on_cancel` turns it into
    :class:`edge_tune.errors.Cancelled` once the checkpoint is written."""


class Interrupt:
    """Turns SIGTERM into :class:`Interrupted`, but never in the middle of a :meth:`guard`ed
    block (an optimizer update cut in half would leave weights and state out of step)."""

    def __init__(self) -> None:
        self.requested = False
        self._depth = 0

    def install(self) -> Interrupt:
        signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        self.requested = True
        if not self._depth:
            raise Interrupted()

    @contextmanager
    def guard(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self.requested and not self._depth:
            raise Interrupted()


@contextmanager
def saved_on_cancel(stop: Interrupt, save: Callable[[], Optional[tuple[int, int]]],
                    emit: Callable, run_dir, finished: Callable[[], bool] = lambda: False
                    ) -> Iterator[None]:
    """Around a training loop: a cancel (SIGTERM seen by ``stop``, which a library may surface
    wrapped in an exception of its own, or Ctrl-C) writes a checkpoint and raises
    :class:`edge_tune.errors.Cancelled` ("training cancelled", exit 130); any other
    exception passes through unchanged.

    ``save()`` writes the checkpoint and returns (step, total steps), or returns None where
    this process writes nothing (only rank 0 writes the run directory). ``finished()``: True
    when the last update is already done, the run then completes instead. A second SIGTERM
    is ignored from the first one on, so it cannot cut the save short."""
    try:
        yield
    except BaseException as exc:
        if not (stop.requested or isinstance(exc, KeyboardInterrupt)):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if finished():
            return
        saved = save()
        if saved is not None:
            emit(Log(f"checkpoint saved at step {saved[0]}/{saved[1]}; resume with "
                     f"`edge-tune train --resume {run_dir}`"))
        raise Cancelled("training cancelled") from None


def check_matches(state: dict, total: int, slots: int, where: str) -> None:
    """A checkpoint continues only the run it was written by: the same step count and the same
    micro-batch slots per step (the data order depends on both). Pure."""
    if (state["total"], state.get("slots")) != (total, slots):
        raise DataError(f"{where}: the checkpoint is for {state['total']} steps of "
                        f"{state.get('slots')} micro-batches, this run has {total} of "
                        f"{slots}; the data or config changed")


# --- optimizer state <-> safetensors + JSON ---------------------------------------------------


def flatten_optimizer(state_dict: dict) -> tuple[dict, dict]:
    """(tensors, json_meta) from ``optimizer.state_dict()``; :func:`unflatten_optimizer` is
    its inverse."""
    import torch

    tensors, scalars = {}, {}
    for idx, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in state_dict["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups,
                     "indices": [str(i) for i in state_dict["state"]]}


def unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for idx in meta["indices"]:
        state[int(idx)] = dict(meta["scalars"].get(idx, {}))
    for name, value in tensors.items():
        if name.startswith("state."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# --- save / load ------------------------------------------------------------------------------


def save(run_dir: Path, model, optimizer, state: dict) -> Path:
    """Write ``run_dir/checkpoint`` atomically (the previous one stays until the new one is
    complete). ``state`` is JSON-safe (step, total, rng, batches, counters)."""
    import torch
    from safetensors.torch import save_file

    final = Path(run_dir) / CHECKPOINT
    lora = {name: p.detach().contiguous() for name, p in model.named_parameters()
            if p.requires_grad}
    opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
    opt_tensors["torch_rng_state"] = torch.get_rng_state()
    from edge_tune.fsutil import disk_full_says

    with disk_full_says(final, lambda: checkpoint_kept(Path(run_dir))), \
            atomic_path(final) as tmp:
        tmp.mkdir()
        save_file(lora, str(tmp / "adapter.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(
            {"format": FORMAT, **state, "optimizer": opt_meta}))
    return final


def read_state(run_dir: Path) -> dict | None:
    """The checkpoint's ``state.json`` (None when the run has no checkpoint)."""
    path = Path(run_dir) / CHECKPOINT / "state.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable checkpoint state ({exc})") from None
    if state.get("format") != FORMAT:
        raise DataError(f"{path}: format {state.get('format')!r} is not {FORMAT!r}")
    return state


def checkpoint_kept(run_dir: Path) -> str:
    """What a run keeps when its training ran out of disk space, and how to go on."""
    try:
        state = read_state(run_dir)
    except EdgeTuneError:
        state = None
    if state is None:
        return ("no checkpoint was written yet, so nothing of this training is kept: free "
                "space and start it again")
    return (f"kept: the checkpoint of step {state['step']}/{state['total']} in "
            f"{run_dir / 'checkpoint'}: free space, then `edge-tune train --resume {run_dir}`")


def restore(ckpt_dir: Path, model, optimizer) -> dict:
    """Load LoRA weights, optimizer state and torch's RNG into the live objects; return the
    JSON state (step, batches, rng, counters) for the loop to continue from."""
    import torch
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir.parent)
    if state is None:
        raise DataError(f"{ckpt_dir}: no checkpoint to resume from")
    lora = load_file(str(ckpt_dir / "adapter.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in lora]
    if missing or any(n not in params for n in lora):
        raise DataError(f"{ckpt_dir}: the checkpoint's LoRA tensors do not match this "
                        f"model (e.g. {(missing or list(lora))[0]})")
    with torch.no_grad():
        for name, value in lora.items():
            if params[name].shape != value.shape:
                raise DataError(f"{ckpt_dir}: {name} has shape {tuple(value.shape)}, "
                                f"the model expects {tuple(params[name].shape)}")
            params[name].copy_(value)
    tensors = load_file(str(ckpt_dir / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("torch_rng_state"))
    optimizer.load_state_dict(unflatten_optimizer(tensors, state["optimizer"]))
    return state



# --- adapters kept after the run: RUN/checkpoint-STEP/ (--save-total-limit) -------------------



def kept_steps(total: int, save_every: int, evals: set[int]) -> set[int]:
    """1-based steps whose adapter ``--save-total-limit`` keeps: every ``save_every`` steps,
    every validation step (``evals``, so that the best can be told) and the last. Pure."""
    every = set(range(save_every, total + 1, save_every)) if save_every else set()
    return every | set(evals) | {total}


def keep_adapter(run_dir: Path, step: int, val_loss: Optional[float], limit: int,
                 write: Callable[[Path], None]) -> Path:
    """Write ``RUN/checkpoint-STEP/`` all-or-nothing: ``write(folder)`` puts the PEFT adapter
    in ``folder`` (``KEPT_ADAPTER``), beside it ``checkpoint.json`` with the step and
    ``val_loss`` (None where none was measured at this step); then remove the kept folders
    beyond the newest ``limit`` and the best (:func:`kept`). Returns the folder."""
    final = Path(run_dir) / f"{KEPT_PREFIX}{step}"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        write(tmp / KEPT_ADAPTER)
        (tmp / KEPT_INFO).write_text(json.dumps({"step": step, "val_loss": val_loss}))
    prune_kept(Path(run_dir), limit)
    return final


def kept(run_dir: Path) -> list[dict]:
    """The run's kept folders, by step: ``{"path": "checkpoint-STEP", "step", "val_loss",
    "best"}``; ``best`` is True for the one with the lowest validation loss (the earliest of
    equals; none when no folder has one). Unreadable folders are left out."""
    rows = []
    for folder in Path(run_dir).glob(f"{KEPT_PREFIX}*"):
        try:
            info = json.loads((folder / KEPT_INFO).read_text())
            step = int(info["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        rows.append({"path": folder.name, "step": step, "val_loss": info.get("val_loss"),
                     "best": False})
    rows.sort(key=lambda r: r["step"])
    scored = [r for r in rows if r["val_loss"] is not None]
    if scored:
        min(scored, key=lambda r: (r["val_loss"], r["step"]))["best"] = True
    return rows


def prune_kept(run_dir: Path, limit: int) -> None:
    """Remove the kept folders other than the newest ``limit`` and the best."""
    from edge_tune.fsutil import remove_tree

    rows = kept(run_dir)
    keep = {r["path"] for r in rows[-limit:]} | {r["path"] for r in rows if r["best"]}
    for r in rows:
        if r["path"] not in keep:
            remove_tree(Path(run_dir) / r["path"])

