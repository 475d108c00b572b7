"""LoRA training with mlx-lm (Apple Silicon; also runs, slowly, on Linux CPUs via ``mlx[cpu]``).

mlx-lm's own tuner does the work (its ``train`` loop, its LoRA layers, its callbacks); edge-tune
supplies what mlx-lm's stock data path cannot express:

* the examples come from edge-tune's dataset pipeline, already tokenized with the model's chat
  template, with the loss on every assistant turn (mlx-lm's own mask is one prompt prefix), so
  a custom batch iterator and loss carry a per-token mask;
* hyperparameters mean what they mean on the CPU backend: ``scale = alpha / rank`` (mlx-lm's
  ``scale`` is the multiplier itself), the same warm-up + cosine schedule, the same gradient
  clipping, the same length-grouped batches and the same validation metric (loss per trained
  token);
* progress is reported through the same events.

The run directory gets the native mlx-lm adapter (``mlx/adapters.safetensors`` and
``mlx/adapter_config.json``, loadable with ``mlx_lm.load(..., adapter_path=RUN/mlx)``) and a
PEFT copy (``adapter/``), from which the worker's caller writes ``adapter.gguf``. With
``--full`` every weight trains (no LoRA layers) and the run gets ``model/``: the weights in the
HF layout (:func:`save_full_model`), which ``train`` converts to ``model.gguf`` as for the cpu
backend. ``--method dpo|orpo`` trains on preference pairs (:mod:`mlx_preference`).
Runs inside the training subprocess (``edge_tune.training.worker``); mlx is imported here only.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

from edge_tune.training.job import TrainJob, WorkerResult
from edge_tune.training.backends.mlx_batches import batch_arrays
from edge_tune.training.loop import (
    eval_steps,
    final_loss,
    grad_accum,
    length_grouped_batches,
    lr_at,
    step_counts,
    warmup_for,
)
from edge_tune.data.template import Example
from edge_tune.errors import UsageError
from edge_tune.events import Log, Metric, Progress

FULL_WEIGHTS = "model.safetensors"  # a full run's weights, HF names (RUN/model/)


def lora_keys(module_names: list[str], targets: list[str]) -> list[str]:
    """The module paths inside a block that get LoRA: those whose last part is a target. Pure."""
    return sorted(n for n in module_names if n.rsplit(".", 1)[-1] in set(targets))


def mlx_lora_config(rank: int, alpha: float, keys: list[str], n_layers: int,
                    model: str, rslora: bool = False, dora: bool = False,
                    dropout: float = 0.0) -> dict:
    """mlx-lm's adapter_config.json for these hyperparameters. mlx-lm has no rsLoRA switch,
    but its ``scale`` is the multiplier itself, so rsLoRA is exact as scale = alpha/sqrt(rank)
    (PEFT's rule; plain LoRA: alpha/rank). DoRA is mlx-lm's ``fine_tune_type`` "dora";
    ``dropout`` is mlx-lm's LoRA input dropout, as PEFT's. Pure."""
    return {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": n_layers,
        "lora_parameters": {"rank": rank,
                            "scale": alpha / math.sqrt(rank) if rslora else alpha / rank,
                            "dropout": dropout,
                            "keys": keys},
        "model": model,
    }


def mark_rslora(peft_dir: Path, alpha: float) -> None:
    """Say rsLoRA in the PEFT copy's adapter_config.json: ``use_rslora`` with the run's alpha
    (mlx_to_peft writes the same scale as a plain alpha = scale * rank; PEFT's alpha/sqrt(r)
    with the run's alpha is that scale)."""
    path = peft_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(use_rslora=True, lora_alpha=alpha)
    path.write_text(json.dumps(config, indent=2))


def save_full_model(model, base_dir: Path, out: Path, chat_template: str | None) -> None:
    """A full run's mlx weights as an HF model directory ``out`` (the cpu backend's layout,
    which ``export`` converts with llama.cpp's converter): ``model.safetensors`` with every
    parameter under mlx-lm's names, which are the HF ones (tied embeddings stored once), the
    base's ``config.json``, and its tokenizer files with ``chat_template`` as the only template
    when one was given (``cpu.copy_tokenizer``)."""
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from edge_tune.training.backends.cpu import copy_tokenizer

    # transformers reads a safetensors file only with a known "format" in its metadata
    mx.save_safetensors(str(out / FULL_WEIGHTS), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    shutil.copy2(base_dir / "config.json", out / "config.json")
    copy_tokenizer(base_dir, out, chat_template)


def mlx_lr_schedule(cfg, total: int) -> Callable:
    """``step (mx array) -> learning rate`` of a ``total``-step run: ``loop.lr_at`` (the
    function the cpu and unsloth backends call) in mlx ops, traced inside mlx-lm's compiled
    step. ``cfg``: the run's TrainConfig."""
    import mlx.core as mx

    warmup = warmup_for(cfg, total)
    return lambda step: lr_at(step.astype(mx.float32), total, cfg.lr, warmup, ops=mx,
                              schedule=cfg.lr_scheduler)


def mlx_optimizer(cfg, schedule: Callable):
    """``cfg.optimizer`` from ``mlx.optimizers`` with ``schedule`` and ``cfg.weight_decay``,
    gradients clipped at norm 1.0 as on the cpu backend; each configured as
    ``loop.torch_optimizer`` configures torch's (AdamW with bias correction, plain SGD,
    Adafactor at the given lr without relative step or parameter scaling)."""
    import mlx.optimizers as optim

    kinds = {"adamw": (optim.AdamW, {"bias_correction": True}), "sgd": (optim.SGD, {}),
             "adafactor": (optim.Adafactor, {"relative_step": False,
                                             "scale_parameter": False})}
    if cfg.optimizer not in kinds:  # the registry refuses it before training starts
        raise UsageError(f"not on mlx (expected {', '.join(kinds)})", setting="optimizer",
                         value=cfg.optimizer)
    base, extra = kinds[cfg.optimizer]

    class Clipped(base):
        def update(self, model_, gradients):  # the CPU backend clips at 1.0 too
            gradients, _ = optim.clip_grad_norm(gradients, 1.0)
            return super().update(model_, gradients)

    return Clipped(learning_rate=schedule, weight_decay=cfg.weight_decay, **extra)


def _make_trainable(model, job: TrainJob) -> dict | None:
    """Unfreeze what the run trains: every weight for ``--full`` (then None), else LoRA layers
    on ``--target-modules`` of every block (then mlx-lm's adapter config for them; EdgeTuneError
    when no block module is a target)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    cfg = job.config
    if cfg.full:  # SFT only: the config refuses --full with --method dpo|orpo
        # every weight, as the cpu backend's --full (mlx-lm's fine_tune_type "full" trains the
        # blocks only, not the embeddings and the final norm)
        model.unfreeze()
        return None
    model.freeze()
    block_modules = [name for name, _ in model.layers[0].named_modules() if name]
    keys = lora_keys(block_modules, cfg.target_modules)
    if not keys:
        raise UsageError("none of "
                         "these modules exists in the model's blocks",
                         setting="target_modules", value=','.join(cfg.target_modules))
    n_layers = len(model.layers)
    native_cfg = mlx_lora_config(cfg.rank, cfg.alpha, keys, n_layers, job.hf_dir,
                                 cfg.rslora, cfg.dora, cfg.lora_dropout)
    linear_to_lora_layers(model, n_layers, native_cfg["lora_parameters"], use_dora=cfg.dora)
    return native_cfg


def _batch_iterator(pad_id: int, rng: random.Random, seen: dict):
    """mlx-lm's ``iterate_batches`` over edge-tune's examples, as (tokens, loss mask) mlx
    arrays: for validation (``loop=False``) every example once, shortest first; for training
    length-grouped batches without end, drawn with ``rng``, adding the tokens they hold
    (cut at ``max_seq_length``) to ``seen["tokens"]``."""
    import mlx.core as mx

    def iterate_batches(dataset, batch_size, max_seq_length, loop=False, seed=None,
                        comm_group=None):
        if not loop:  # validation: every example once, shortest first
            order = sorted(range(len(dataset)), key=lambda i: len(dataset[i].input_ids))
            for k in range(0, len(order), batch_size):
                tokens, mask = batch_arrays([dataset[i] for i in order[k:k + batch_size]],
                                            pad_id, max_seq_length)
                yield mx.array(tokens), mx.array(mask)
            return
        while True:
            for batch in length_grouped_batches([len(e.input_ids) for e in dataset],
                                                batch_size, rng):
                chosen = [dataset[i] for i in batch]
                seen["tokens"] += sum(min(len(e.input_ids), max_seq_length) for e in chosen)
                tokens, mask = batch_arrays(chosen, pad_id, max_seq_length)
                yield mx.array(tokens), mx.array(mask)

    return iterate_batches


def _save_adapter(native: Path, native_cfg: dict, out: Path, job: TrainJob) -> None:
    """Complete the native mlx-lm adapter in ``native`` (its weights are there) with its
    config, and write its PEFT copy to ``out`` (rsLoRA marked as such)."""
    from edge_tune.converters.formats import mlx_to_peft

    (native / mlx_to_peft.CONFIG).write_text(json.dumps(native_cfg, indent=2))
    mlx_to_peft.convert(native, out, base_model=job.hf_dir)
    if job.config.rslora:
        mark_rslora(out, job.config.alpha)


def train(job: TrainJob | Mapping, emit: Callable) -> WorkerResult:
    """Train a LoRA adapter with mlx-lm; the native adapter goes to ``RUN/mlx``, a PEFT copy
    to ``job.adapter_dir``. Reads of ``job``: config, hf_dir, examples, val_examples, pad_id,
    run_dir."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm import load as mlx_load
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.tuner.trainer import evaluate as mlx_evaluate
    from mlx_lm.tuner.trainer import grad_checkpoint
    from mlx_lm.tuner.trainer import train as mlx_train

    from edge_tune.training.backends.mlx_config import mlx_load_kwargs
    from edge_tune.converters.formats import mlx_to_peft
    from edge_tune.fsutil import atomic_path
    from edge_tune.training.checkpoint import keep_adapter, kept_steps

    job = TrainJob.of(job)
    cfg = job.config
    mx.random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    emit(Progress("load", 0, None, "", "loading base model (mlx)"))
    t0 = time.perf_counter()
    # transformers 5 configs keep RoPE where mlx-lm does not look: translate (mlx_config)
    model, _ = mlx_load(job.hf_dir, **mlx_load_kwargs(job.hf_dir, cfg.seq_len))
    full = cfg.full
    native_cfg = _make_trainable(model, job)
    n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    what = "parameters (full fine-tuning, fp32 weights)" if full else "LoRA parameters"
    emit(Log(f"model loaded in {time.perf_counter() - t0:.1f}s; {n_train / 1e6:.2f}M trainable "
             f"{what}; mlx on {mx.default_device()}"))

    examples: list[Example] = job.examples
    val_examples: list[Example] = job.val_examples
    accum = grad_accum(cfg)  # micro-batches per optimizer step
    total, steps_per_epoch, warmup = step_counts(cfg, len(examples))
    pad_id, limit = job.pad_id, cfg.seq_len

    # torch's AdamW corrects the moments' start-up bias; mlx's does only when asked.
    opt = mlx_optimizer(cfg, mlx_lr_schedule(cfg, total))
    rng = random.Random(cfg.seed)
    seen = {"tokens": 0}
    iterate_batches = _batch_iterator(pad_id, rng, seen)

    def masked_loss(model_, tokens, mask):
        logits = model_(tokens[:, :-1])
        ce = nn.losses.cross_entropy(logits, tokens[:, 1:]) * mask
        ntoks = mask.sum()
        return ce.astype(mx.float32).sum() / ntoks, ntoks

    clock = {"start": time.perf_counter(), "paused": 0.0}
    val_loss_box: dict = {"value": None}

    losses: list[float] = []

    evals = eval_steps(total, cfg.eval_every) if val_examples else set()
    keep = kept_steps(total, cfg.save_every or 0, evals) if cfg.save_total_limit else set()

    def write_adapter(folder: Path) -> None:  # a kept checkpoint: the PEFT copy of now
        with tempfile.TemporaryDirectory(prefix="edge-tune-mlx-") as work:
            mx.save_safetensors(str(Path(work) / mlx_to_peft.WEIGHTS),
                                dict(tree_flatten(model.trainable_parameters())))
            _save_adapter(Path(work), native_cfg, folder, job)

    def validate() -> float:
        return mlx_evaluate(model, val_examples, cfg.batch_size, -1, limit, loss=masked_loss,
                            iterate_batches=iterate_batches)

    class Events(TrainingCallback):
        # mlx-lm validates *before* a step (and before the first); edge-tune reports validation
        # after steps ``eval_steps()`` on every backend, so it runs it here instead.
        def on_train_loss_report(self, info: dict) -> None:
            step = info["iteration"] // accum  # mlx-lm counts micro-batches
            losses.append(float(info["train_loss"]))
            elapsed = time.perf_counter() - clock["start"] - clock["paused"]
            emit(Metric(step=step, total_steps=total, loss=float(info["train_loss"]),
                        tokens_per_second=seen["tokens"] / max(elapsed, 1e-9),
                        eta_seconds=elapsed / step * (total - step),
                        learning_rate=float(info["learning_rate"]),
                        epoch=step / steps_per_epoch))
            if step in evals:
                t_eval = time.perf_counter()
                val_loss_box["value"] = validate()
                model.train()
                clock["paused"] += time.perf_counter() - t_eval  # tok/s: training time only
                emit(Metric(step=step, total_steps=total, loss=val_loss_box["value"],
                            split="val", epoch=step / steps_per_epoch))
            if step in keep:
                keep_adapter(run_dir, step, val_loss_box["value"] if step in evals else None,
                             cfg.save_total_limit, write_adapter)

    run_dir, out = Path(job.run_dir), Path(job.adapter_dir)
    with contextlib.ExitStack() as stack:
        if full:  # the whole model, in the HF layout, where a LoRA run's PEFT copy goes
            out.mkdir(exist_ok=True)  # the worker's temporary path, renamed when done
            weights = out / FULL_WEIGHTS
        else:  # the native mlx-lm adapter, then its PEFT copy
            native = stack.enter_context(atomic_path(run_dir / "mlx"))
            native.mkdir()
            weights = native / mlx_to_peft.WEIGHTS
        args = TrainingArgs(
            batch_size=cfg.batch_size, iters=total * accum, val_batches=-1,
            steps_per_report=accum, grad_accumulation_steps=accum,
            grad_checkpoint=cfg.grad_checkpoint,
            steps_per_eval=total + 1, steps_per_save=total + 1, max_seq_length=limit,
            adapter_file=str(weights))
        if cfg.method != "sft":  # DPO/ORPO: mlx-lm has no preference trainer (mlx_preference)
            from edge_tune.training.backends import mlx_preference

            if cfg.grad_checkpoint:
                grad_checkpoint(model.layers[0])
            done = mlx_preference.fit(
                model, opt, job, emit, total, steps_per_epoch, warmup, accum, evals,
                keep=lambda step, val: step in keep and keep_adapter(
                    run_dir, step, val, cfg.save_total_limit, write_adapter))
            losses, seen["tokens"] = done["losses"], done["tokens"]
            val_loss_box["value"], train_seconds = done["val_loss"], done["train_seconds"]
            mx.save_safetensors(str(weights), dict(tree_flatten(model.trainable_parameters())))
        else:
            clock["start"] = time.perf_counter()
            mlx_train(model, opt, examples, None, args, loss=masked_loss,
                      iterate_batches=iterate_batches, training_callback=Events())
            train_seconds = time.perf_counter() - clock["start"] - clock["paused"]
        if full:
            save_full_model(model, Path(job.hf_dir), out, job.chat_template)
        else:
            _save_adapter(native, native_cfg, out, job)
    return WorkerResult(
        steps=total,
        final_loss=final_loss(losses),
        losses=[round(x, 6) for x in losses],  # per optimizer step (the loss curve)
        val_loss=val_loss_box["value"],
        tokens=seen["tokens"],
        tokens_per_second=seen["tokens"] / max(train_seconds, 1e-9),
        train_seconds=train_seconds,
        precision="fp32",
        trainable_parameters=int(n_train),
        mlx_adapter=None if full else "mlx",
    )
