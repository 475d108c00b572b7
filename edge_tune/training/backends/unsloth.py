"""4-bit QLoRA on an NVIDIA GPU with Unsloth (``--backend unsloth``).

Unsloth loads the base in 4-bit (bitsandbytes NF4) with its own Triton kernels for attention,
the LoRA MLP/QKV paths and the cross-entropy, and its gradient checkpointing (activations
offloaded to CPU memory): less VRAM and more tokens/s than plain transformers + PEFT.

Everything around it is edge-tune's, the same as on the CPU backend:

* the examples are the worker's pre-tokenized ``job.examples`` (input_ids + labels with
  -100 outside the assistant turns), fed to transformers' ``Trainer`` (Unsloth's supported
  path) through a padding collator, so the loss is on exactly the same tokens;
* hyperparameters mean the same: ``rank``/``alpha``/``rslora`` (scale alpha/rank, or
  alpha/sqrt(rank) for rsLoRA), ``lr`` with the CPU backend's schedule (``loop.lr_at``:
  linear warm-up, cosine to 10%), AdamW with weight decay 0, gradient clipping at 1.0,
  ``batch_size`` examples per micro-batch times ``grad_accum`` micro-batches per step,
  ``max_steps``/``epochs``, ``seq_len``, ``seed``, and the same data order
  (``loop.slot_orders``: length-grouped micro-batches, one per slot of the global batch);
* under torchrun (``--nproc``) it is DDP over NCCL: each rank loads the 4-bit base on its own
  GPU (LOCAL_RANK), reads its shard, and the Trainer all-reduces the LoRA gradients;
* progress goes out as the same ``Metric`` events (train loss per step, tokens/s, ETA, and
  validation loss per trained token after ``loop.eval_steps``);
* the PEFT adapter lands in ``job.adapter_dir``; ``api.train`` writes ``adapter.gguf`` and
  the manifest, as for every backend;
* checkpoints are the CPU backend's (``edge_tune.training.checkpoint``: safetensors + JSON, never
  the Trainer's own pickled ones): every ``save_every`` steps and on cancel (SIGTERM), and
  ``--resume`` continues at the saved step with the same data order, schedule and counters.

Unsloth patches transformers, peft and trl when it is imported, so it must be imported before
them, and only inside the training subprocess: the registry lists it as this backend's
``preload``, which the worker imports before it tokenizes anything. This module imports no
heavy library at load time; the argument mappings are pure functions that CPU-only CI tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from edge_tune.training import checkpoint
from edge_tune.training.backends.cpu import collate
from edge_tune.training.job import TrainJob, WorkerResult, as_config
from edge_tune.training.loop import (  # noqa: F401 (grad_accum, step_counts: re-exported)
    Distributed,
    eval_steps,
    final_loss,
    grad_accum,
    lr_at,
    pair_means,
    slot_orders,
    step_counts,
    torch_optimizer,
)
from edge_tune.config import ALL_LINEAR, TrainConfig
from edge_tune.data.template import IGNORE, Example
from edge_tune.errors import DataError, UsageError
from edge_tune.events import Log, Metric, Progress

PAD_MULTIPLE = 8  # pad widths to a multiple of 8: tensor cores want aligned shapes


# --- pure mappings: edge-tune's TrainConfig -> Unsloth / transformers arguments ----------------
# (a mapping of settings is taken too, see ``job.as_config``; the step counts are
# ``loop.step_counts``, shared with the other backends)


def compute_dtype(precision: str, bf16_supported: bool) -> str | None:
    """The dtype name for ``FastLanguageModel.from_pretrained(dtype=...)``; None lets Unsloth
    choose (bf16 where the GPU has it, fp16 otherwise). Pure."""
    if precision == "auto":
        return None
    if precision == "bf16":
        if not bf16_supported:
            raise UsageError("this GPU has no bf16 (compute capability "
                             "below 8.0); use --precision auto (fp16 compute)",
                             setting="precision", value="bf16")
        return "bfloat16"
    raise UsageError("the unsloth backend computes in bf16 or fp16 "
                     "over a 4-bit base; use --precision auto or bf16",
                     setting="precision", value=precision)


def mixed_precision(dtype: str | None, bf16_supported: bool) -> str:
    """'bf16' or 'fp16': the Trainer's mixed precision for the compute dtype. Pure."""
    if dtype is None:
        return "bf16" if bf16_supported else "fp16"
    return "bf16" if dtype == "bfloat16" else "fp16"


def from_pretrained_kwargs(cfg: TrainConfig | Mapping, model_ref: str,
                           bf16_supported: bool = True) -> dict:
    """``FastLanguageModel.from_pretrained`` arguments. ``model_ref`` is the worker's local HF
    directory (a hub model is downloaded there first): Unsloth given a hub *name* may swap in
    its own pre-quantized repo, and the adapter must be trained on the weights the GGUF base
    is made from. Pure."""
    cfg = as_config(cfg)
    return {
        "model_name": str(model_ref),
        "max_seq_length": cfg.seq_len,
        "load_in_4bit": True,
        "dtype": compute_dtype(cfg.precision, bf16_supported),
        "trust_remote_code": False,
    }


def peft_kwargs(cfg: TrainConfig | Mapping) -> dict:
    """``FastLanguageModel.get_peft_model`` arguments: the LoRA variant as on the CPU backend
    (rsLoRA, DoRA, dropout, target modules; ``use_dora`` goes through to PEFT's LoraConfig).
    Dropout 0 and no bias (the defaults) keep Unsloth on its fused LoRA kernels. Pure."""
    cfg = as_config(cfg)
    targets = cfg.target_modules
    return {
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "target_modules": targets[0] if targets == [ALL_LINEAR] else list(targets),
        "lora_dropout": cfg.lora_dropout,
        "bias": "none",
        "use_gradient_checkpointing": "unsloth",
        "random_state": cfg.seed,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.dora,
    }


def training_args_kwargs(cfg: TrainConfig | Mapping, total_steps: int, output_dir: str,
                         precision: str) -> dict:
    """``transformers.TrainingArguments`` for one run. The learning-rate schedule is not here:
    :class:`EdgeTrainer` replaces the Trainer's with ``loop.lr_at`` (the Trainer's own warm-up
    starts at lr 0, one step behind the CPU backend's). Nothing is saved, evaluated or
    reported by the Trainer itself: the adapter is saved once at the end, validation and
    progress go through edge-tune's events. Pure."""
    cfg = as_config(cfg)
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": grad_accum(cfg),
        "max_steps": total_steps,
        "learning_rate": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": 1.0,
        # informative: new_optimizer makes it (edge-tune's checkpoints hold its state)
        "optim": TRL_OPTIM[cfg.optimizer],
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "remove_unused_columns": False,  # the collator builds the model's inputs itself
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        # DDP under torchrun: every LoRA parameter gets a gradient each step, so no search
        # for unused ones (which also clashes with gradient checkpointing).
        "ddp_find_unused_parameters": False,
    }


# --optimizer -> the name transformers' TrainingArguments.optim gives it
TRL_OPTIM = {"adamw": "adamw_torch", "adamw_8bit": "adamw_8bit", "sgd": "sgd",
             "adafactor": "adafactor"}


def lr_factor(total: int, warmup: int, first: int = 0,
              schedule: str = "cosine") -> Callable[[int], float]:
    """The ``LambdaLR`` multiplier that reproduces ``loop.lr_at`` (step is 0-based). A run
    resumed at step ``first`` counts the scheduler's steps from there: the schedule goes on
    where it stopped instead of warming up again. Pure."""
    return lambda step: lr_at(first + step, total, 1.0, warmup, schedule=schedule)


check_checkpoint = checkpoint.check_matches  # the same rule as every backend's


# --- preference tuning: TRL's DPOTrainer / ORPOTrainer (Unsloth's PatchDPOTrainer) -------------

#: ``--method`` -> (module, config class, trainer class) in TRL 1.x (ORPO lives in
#: ``trl.experimental`` since TRL 0.2x).
TRL_TRAINERS = {"dpo": ("trl", "DPOConfig", "DPOTrainer"),
                "orpo": ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer"),
                "kto": ("trl", "KTOConfig", "KTOTrainer")}
#: Metric field -> the key TRL's DPO and ORPO trainers log it under (mean over the step).
REWARD_LOGS = {"reward_margin": "rewards/margins", "reward_accuracy": "rewards/accuracies"}


def preference_args_kwargs(cfg: TrainConfig | Mapping, total_steps: int, output_dir: str,
                           precision: str) -> dict:
    """``DPOConfig`` / ``ORPOConfig`` arguments: :func:`training_args_kwargs` plus the
    method's. ``beta`` is DPO's β or ORPO's λ (TRL names both ``beta``, as edge-tune's
    ``--beta``); ``max_length`` the run's ``--seq-len`` (the examples are already cut to it);
    dropout stays as ``--lora-dropout`` says (TRL turns it off by default). DPO keeps TRL's
    default sigmoid loss with the reference computed in each step (not precomputed). Pure."""
    cfg = as_config(cfg)
    if cfg.method not in TRL_TRAINERS:
        raise UsageError("no TRL trainer for it (expected dpo, orpo "
                         "or kto)", setting="method", value=cfg.method)
    kw = training_args_kwargs(cfg, total_steps, output_dir, precision)
    kw.update(beta=cfg.beta, max_length=cfg.seq_len, disable_dropout=False)
    if cfg.method in ("dpo", "kto"):
        kw.update(precompute_ref_log_probs=False)
    if cfg.method == "kto":
        # KTOTrainer insists on sequential sampling for its KL rows; the batches here are
        # edge-tune's (kto_rows: the KL rows are made per batch, as TRL's collator does)
        kw.update(loss_type="kto", desirable_weight=cfg.desirable_weight,
                  undesirable_weight=cfg.undesirable_weight,
                  train_sampling_strategy="sequential")
    return kw


def pair_batch(pairs: list, pad_id: int, method: str, multiple: int = PAD_MULTIPLE,
               limit: int | None = None) -> dict:
    """A batch of ``PairExample`` in the input format of TRL's trainer for ``method``, with
    the loss on edge-tune's trained tokens (the answer, end of turn included):

    * DPO (``DataCollatorForPreference``'s output): ``input_ids``, ``attention_mask`` and
      ``completion_mask`` (1 where the token is trained), chosen rows then rejected rows;
    * ORPO (``DPODataCollatorWithPadding``'s output): ``chosen_input_ids``,
      ``chosen_attention_mask``, ``chosen_labels`` (-100 outside the answer) and the same
      for ``rejected_``;
    * KTO (``DataCollatorForUnpairedPreference``'s output) from ``KTOExample``:
      ``input_ids``, ``attention_mask``, ``completion_mask``, the same three with ``KL_``
      for the KL rows (``preference.kto_rows``, cut to ``limit``) and ``label`` (bool).

    Right-padded to a multiple of ``multiple``."""
    if method == "kto":
        import torch

        from edge_tune.data.preference import kto_rows

        n = len(pairs)
        ids, labels, mask = collate(kto_rows(pairs, limit), pad_id, multiple)
        done = (labels != IGNORE).long()
        return {"input_ids": ids[:n], "attention_mask": mask[:n], "completion_mask": done[:n],
                "KL_input_ids": ids[n:], "KL_attention_mask": mask[n:],
                "KL_completion_mask": done[n:],
                "label": torch.tensor([p.desirable for p in pairs], dtype=torch.bool)}
    if method == "dpo":
        ids, labels, mask = collate([p.chosen for p in pairs] + [p.rejected for p in pairs],
                                    pad_id, multiple)
        return {"input_ids": ids, "attention_mask": mask,
                "completion_mask": (labels != IGNORE).long()}
    batch = {}
    for side in ("chosen", "rejected"):
        ids, labels, mask = collate([getattr(p, side) for p in pairs], pad_id, multiple)
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask,
                      f"{side}_labels": labels})
    return batch


def batch_tokens(inputs: Mapping) -> int:
    """Tokens (padding excluded) in a collated batch of any of the formats above."""
    return sum(int(v.sum()) for k, v in inputs.items() if k.endswith("attention_mask"))


def reward_fields(logs: Mapping) -> dict:
    """``Metric`` reward fields from one of TRL's log records (empty for SFT). Pure."""
    return {field: float(logs[key]) for field, key in REWARD_LOGS.items() if key in logs}


def pretokenized(trainer_class):
    """``trainer_class`` without its own tokenization: TRL's DPO and ORPO trainers tokenize
    text columns when built; edge-tune's batches are already tokens (:func:`pair_batch`)."""

    class Pretokenized(trainer_class):
        def _prepare_dataset(self, dataset, *args, **kwargs):  # DPOTrainer
            return dataset

        def tokenize_row(self, feature, model=None):  # ORPOTrainer
            return feature

    return Pretokenized


def trl_trainer(method: str):
    """(config class, trainer class) of TRL for ``method``, Unsloth's patches applied where
    Unsloth is loaded (``PatchDPOTrainer`` covers DPO and ORPO)."""
    import importlib
    import sys

    if "unsloth" in sys.modules:
        from unsloth import PatchDPOTrainer

        PatchDPOTrainer()
    module, config, trainer = TRL_TRAINERS[method]
    mod = importlib.import_module(module)
    return getattr(mod, config), getattr(mod, trainer)


# --- the Trainer side (torch/transformers imported inside) ------------------------------------


def pad_batch(examples: list[Example], pad_id: int, multiple: int = PAD_MULTIPLE) -> dict:
    """input_ids / attention_mask / labels, right-padded to the longest example rounded up to
    ``multiple``; padding carries no loss."""
    ids, labels, mask = collate(examples, pad_id, multiple)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def evaluate(model, examples: list[Example], batch_size: int, pad_id: int,
             autocast_dtype=None) -> float:
    """Mean loss per trained token (the CPU backend's validation metric), no gradients."""
    import contextlib

    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with torch.no_grad(), amp:
        for k in range(0, len(order), batch_size):
            batch = pad_batch([examples[i] for i in order[k:k + batch_size]], pad_id)
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            # use_cache=False: no KV cache, so Unsloth stays off its generation fast path
            loss = model(**{key: v.to(device) for key, v in batch.items()}, use_cache=False).loss
            total += float(loss) * n
            count += n
    model.train(was_training)
    return total / max(1, count)


def new_optimizer(model, cfg: TrainConfig | Mapping):
    """``--optimizer`` over the LoRA parameters, made as the CPU backend makes it (one group,
    ``loop.torch_optimizer``): edge-tune's checkpoints hold its state."""
    return torch_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])


def _kto_terms(batch: list, method: str, weights: tuple[float, float]):
    import torch

    if method != "kto":
        return None
    return (torch.tensor([e.desirable for e in batch], dtype=torch.bool), *weights)


def evaluate_pairs(model, pairs: list, batch_size: int, pad_id: int, method: str, beta: float,
                   autocast_dtype=None,
                   weights: tuple[float, float] = (1.0, 1.0)) -> tuple[float, float, float]:
    """(mean loss, reward margin, reward accuracy) over preference pairs (or KTO examples,
    ``weights`` its desirable/undesirable weights), weighted by pairs: the CPU backend's
    validation metric (``preference_loss.pair_loss``), no gradients."""
    import contextlib

    import torch

    from edge_tune.training.preference_loss import pair_loss

    device = next(model.parameters()).device
    batches = []
    was_training = model.training
    model.eval()
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with torch.no_grad(), amp:
        for k in range(0, len(pairs), batch_size):
            batch = pairs[k:k + batch_size]
            if method == "kto":
                from edge_tune.data.preference import kto_rows

                ids, labels, mask = collate(kto_rows(batch), pad_id)
            else:
                ids, labels, mask = collate([p.chosen for p in batch] +
                                            [p.rejected for p in batch], pad_id)
            out = pair_loss(model, ids.to(device), labels.to(device), mask.to(device), method,
                            beta, _kto_terms(batch, method, weights))
            batches.append((len(batch), (float(out.loss), *out.stats())))
    model.train(was_training)
    return pair_means(batches)


def fit(model, job: TrainJob | Mapping, emit: Callable, precision: str = "none",
        autocast_dtype=None, tokenizer=None) -> WorkerResult:
    """Train the LoRA parameters of ``model`` (a PEFT model) on ``job.examples`` with
    transformers' Trainer and edge-tune's schedule, sampling, metrics and events. With
    ``--method dpo|orpo`` the Trainer is TRL's ``DPOTrainer`` / ``ORPOTrainer`` (``tokenizer``
    is its ``processing_class``; the batches are still edge-tune's, :func:`pair_batch`), and
    the metrics carry the reward margin and accuracy TRL logs.

    ``precision``: the Trainer's mixed precision, 'bf16', 'fp16' or 'none' (CPU tests).
    Checkpoints (``edge_tune.training.checkpoint``, the CPU backend's format) go to
    ``job.run_dir`` every ``save_every`` steps and when ``job.interrupt`` sees SIGTERM,
    which then raises :class:`edge_tune.errors.Cancelled`; ``job.resume_from`` continues one.
    Returns the same result fields as the CPU backend (the adapter is the caller's to save)."""
    job = TrainJob.of(job)
    args_class, trainer_base = _trainer_classes(job.config.method)
    run = _FitRun(model, job, emit, precision, autocast_dtype)
    if run.first >= run.total:  # cancelled after its last update: only the weights are left to load
        run.restore(new_optimizer(model, run.cfg))
    else:
        _train_with_trainer(run, args_class, trainer_base, tokenizer)
    return run.result()


def _trainer_classes(method: str):
    """(arguments class, Trainer class) for ``--method``: TRL's for dpo/orpo (the rest of the
    loop is the same), transformers' ``TrainingArguments`` and ``Trainer`` for sft."""
    from transformers import Trainer, TrainingArguments

    if method != "sft":
        return trl_trainer(method)
    return TrainingArguments, Trainer


def _run_so_far(resume_from, total: int, slots: int) -> dict:
    """The run as of its last completed step: step, tokens, losses, val_loss and seconds, all
    zero for a fresh run, the checkpoint's for ``resume_from`` (EdgeTuneError when there is
    none there or it belongs to another run shape)."""
    done = {"step": 0, "tokens": 0, "losses": [], "val_loss": None, "seconds": 0.0}
    if resume_from:
        state = checkpoint.read_state(Path(resume_from).parent)
        if state is None:
            raise DataError(f"{resume_from}: no checkpoint to resume from")
        check_checkpoint(state, total, slots, resume_from)
        done.update(step=state["step"], tokens=state["tokens"], losses=list(state["losses"]),
                    val_loss=state.get("val_loss"), seconds=state["train_seconds"])
    return done


class _FitRun:
    """One :func:`fit` call: its data order and step counts, and the run so far as of its last
    completed step (a checkpoint's when resuming: the data order and the schedule are functions
    of the step, so nothing else is needed). The Trainer's hooks read and update it."""

    def __init__(self, model, job: TrainJob, emit: Callable, precision: str, autocast_dtype):
        cfg = self.cfg = job.config
        self.model, self.job, self.emit = model, job, emit
        self.precision, self.autocast_dtype = precision, autocast_dtype
        self.preference = cfg.method != "sft"
        # Under torchrun (DDP: NCCL on CUDA, gloo on CPU) this rank holds its shard only and
        # trains its slots' micro-batches, the cpu backend's data order (edge_tune.data.sharding).
        self.dist = dist = Distributed()
        self.orders = slot_orders(job, grad_accum(cfg), dist)
        self.slots = grad_accum(cfg) * dist.world
        self.total, self.per_epoch, self.warmup = step_counts(
            cfg, dist.sum_int(len(job.examples)), dist.world)
        self.evals = eval_steps(self.total, cfg.eval_every) if job.val_examples else set()
        self.stop = job.interrupt or checkpoint.Interrupt()  # the worker's handles SIGTERM
        self.save_every = (cfg.save_every or 0) if job.run_dir else 0
        self.keep = checkpoint.kept_steps(self.total, cfg.save_every or 0, self.evals) \
            if cfg.save_total_limit and job.run_dir else set()
        self.done = _run_so_far(job.resume_from, self.total, self.slots)
        self.first, self.base_tokens = self.done["step"], self.done["tokens"]
        self.losses = self.done["losses"]
        self.clock = {"start": time.perf_counter() - self.done["seconds"], "paused": 0.0,
                      "tokens": 0}
        # Holds stop.guard() from the optimizer step until that step is recorded: a SIGTERM in
        # between waits, so a checkpoint never has half an update (weights, moments, counters).
        self.updating = contextlib.ExitStack()
        self.trainer = None  # set once built: its optimizer and scaler go into checkpoints

    def elapsed(self) -> float:
        """Training seconds so far (validation excluded)."""
        return time.perf_counter() - self.clock["start"] - self.clock["paused"]

    def guard_update(self) -> None:
        """Hold off SIGTERM until the update now starting is recorded (:meth:`step_logged`)."""
        self.updating.enter_context(self.stop.guard())

    def restore(self, optimizer, scaler=None) -> None:
        """Load the ``job.resume_from`` checkpoint into the model, ``optimizer`` and (fp16)
        ``scaler``."""
        state = checkpoint.restore(Path(self.job.resume_from), self.model, optimizer)
        if scaler is not None and state.get("grad_scaler"):  # fp16: keep the loss scale
            scaler.load_state_dict(state["grad_scaler"])
        self.emit(Log(f"resumed from the checkpoint at step {self.first}/{self.total}"))

    def save_checkpoint(self) -> None:
        """Write the run as of its last completed step to ``job.run_dir``."""
        done = self.done
        state = {"step": done["step"], "total": self.total, "slots": self.slots,
                 "tokens": done["tokens"], "losses": self.losses, "val_loss": done["val_loss"],
                 "train_seconds": self.elapsed()}
        scaler = self.trainer.accelerator.scaler
        if scaler is not None and scaler.is_enabled():
            state["grad_scaler"] = scaler.state_dict()
        checkpoint.save(Path(self.job.run_dir), self.model, self.trainer.optimizer, state)

    def save_on_cancel(self):
        """``checkpoint.saved_on_cancel``'s save: (step, total) where this rank wrote one."""
        # The weights are those after done["step"]: the update is guarded, and the forward
        # and backward passes of a step cut short change none.
        self.updating.pop_all()  # an update cut short by an error, if any, is not resumed
        if self.dist.rank == 0 and self.job.run_dir:  # rank 0 writes (all ranks hold the same)
            self.save_checkpoint()
            return self.done["step"], self.total
        return None

    def step_logged(self, global_step: int, logs: Mapping, model) -> None:
        """The Trainer logged step ``first + global_step``: record it and emit its Metric, then
        validate and save a checkpoint where due."""
        step = self.first + global_step
        self.losses.append(float(logs["loss"]))  # the Trainer's mean over all ranks
        # every rank logs each step
        self.done.update(step=step,
                         tokens=self.base_tokens + self.dist.sum_int(self.clock["tokens"]))
        seconds = self.elapsed()
        self.emit(Metric(step=step, total_steps=self.total, loss=self.losses[-1],
                         tokens_per_second=self.done["tokens"] / max(seconds, 1e-9),
                         eta_seconds=seconds / step * (self.total - step),
                         learning_rate=lr_at(step - 1, self.total, self.cfg.lr, self.warmup,
                                             schedule=self.cfg.lr_scheduler),
                         epoch=step / self.per_epoch, **reward_fields(logs)))
        self.updating.close()  # the step is recorded: a SIGTERM that waited raises Cancelled
        if step in self.evals:
            self.validate(model, step)
        if (self.save_every and step % self.save_every == 0 and step < self.total
                and self.dist.rank == 0):
            with self.stop.guard():
                self.save_checkpoint()
        if step in self.keep and self.dist.rank == 0:
            with self.stop.guard():
                checkpoint.keep_adapter(
                    Path(self.job.run_dir), step,
                    self.done["val_loss"] if step in self.evals else None,
                    self.cfg.save_total_limit,
                    lambda d: self.model.save_pretrained(str(d), safe_serialization=True))

    def validate(self, model, step: int) -> None:
        """Validation loss (and, for dpo/orpo, rewards) after ``step`` as a ``split="val"``
        Metric; its time does not count as training time."""
        cfg, pad_id, val_examples = self.cfg, self.job.pad_id, self.job.val_examples
        t_eval = time.perf_counter()
        val_rewards = {}
        if self.preference:
            self.done["val_loss"], *stats = evaluate_pairs(
                model, val_examples, cfg.batch_size, pad_id, cfg.method, cfg.beta,
                self.autocast_dtype, (cfg.desirable_weight, cfg.undesirable_weight))
            val_rewards = dict(zip(REWARD_LOGS, stats))
        else:
            self.done["val_loss"] = evaluate(model, val_examples, cfg.batch_size, pad_id,
                                             self.autocast_dtype)
        self.clock["paused"] += time.perf_counter() - t_eval  # tok/s: training time only
        self.emit(Metric(step=step, total_steps=self.total, loss=self.done["val_loss"],
                         split="val", epoch=step / self.per_epoch, **val_rewards))

    def result(self) -> WorkerResult:
        """The CPU backend's result fields for the run as it stands."""
        train_seconds = self.elapsed()
        done = self.done
        return WorkerResult(
            steps=self.total,
            final_loss=final_loss(self.losses),
            val_loss=done["val_loss"],
            tokens=done["tokens"],
            tokens_per_second=done["tokens"] / max(train_seconds, 1e-9),
            train_seconds=train_seconds,
            precision=self.precision,
            trainable_parameters=sum(p.numel() for n, p in self.model.named_parameters()
                                     if p.requires_grad and ".ref." not in n),
            losses=[round(x, 6) for x in self.losses],
            world_size=self.dist.world,
            examples=self.dist.sum_int(len(self.job.examples)),
        )


class _SlotBatches:
    """This rank's micro-batches in step order from step ``run.first``, one per slot it owns."""

    def __init__(self, run: _FitRun) -> None:
        self.run = run

    def __len__(self) -> int:
        return (self.run.total - self.run.first) * len(self.run.orders)

    def __iter__(self):
        for step in range(self.run.first, self.run.total):
            for batch_at in self.run.orders:
                yield batch_at(step)


def _edge_trainer(trainer_base, run: _FitRun):
    """``trainer_base`` (transformers' or TRL's Trainer class) with ``run``'s data order,
    optimizer (a checkpoint's state restored), schedule and token count."""
    import torch
    from torch.utils.data import DataLoader

    class EdgeTrainer(pretokenized(trainer_base)):
        def get_train_dataloader(self):
            # Not through accelerate's prepare: that would shard the batches across ranks
            # again, and each rank already reads only its own shard.
            return DataLoader(run.job.examples, batch_sampler=_SlotBatches(run),
                              collate_fn=self.data_collator, num_workers=0)

        def create_optimizer(self, model_=None):
            # The checkpoint's state goes in here, before accelerate wraps the optimizer (and
            # never through the Trainer's resume_from_checkpoint: that one pickles).
            if self.optimizer is None:
                self.optimizer = new_optimizer(run.model, run.cfg)
                # The update itself is guarded whichever training loop calls it (Unsloth
                # patches the Trainer's); on_pre_optimizer_step also covers the GradScaler's.
                self.optimizer.register_step_pre_hook(lambda *_: run.guard_update())
                if run.job.resume_from:
                    run.restore(self.optimizer, self.accelerator.scaler)
            return self.optimizer

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                optimizer = optimizer or self.optimizer
                for group in optimizer.param_groups:  # the schedule's base is the peak lr
                    group["initial_lr"] = run.cfg.lr
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, lr_factor(run.total, run.warmup, run.first,
                                         run.cfg.lr_scheduler))
            return self.lr_scheduler

        def training_step(self, model_, inputs, *args, **kwargs):
            run.clock["tokens"] += batch_tokens(inputs)
            return super().training_step(model_, inputs, *args, **kwargs)

    return EdgeTrainer


def _events(run: _FitRun):
    """The Trainer callback that hands ``run`` its steps: clock start, update guard, logs."""
    from transformers import TrainerCallback

    class Events(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            run.clock["start"] = time.perf_counter() - run.done["seconds"]

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            run.guard_update()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:  # the end-of-run summary has no "loss"
                return
            run.step_logged(state.global_step, logs, kwargs["model"])

    return Events()


def _trainer_inputs(run: _FitRun, tokenizer) -> dict:
    """The Trainer's dataset and collator (and TRL's ``processing_class``) for ``run``."""
    pad_id, method, limit = run.job.pad_id, run.cfg.method, run.cfg.seq_len
    if not run.preference:
        return {"train_dataset": run.job.examples,
                "data_collator": lambda batch: pad_batch(batch, pad_id)}
    from datasets import Dataset

    # TRL's trainers want a datasets.Dataset; the batches come from get_train_dataloader, so
    # the rows only need to exist.
    return {"train_dataset": Dataset.from_dict({"pair": list(range(len(run.job.examples)))}),
            "processing_class": tokenizer,
            "data_collator": lambda batch: pair_batch(batch, pad_id, method, limit=limit)}


def _train_with_trainer(run: _FitRun, args_class, trainer_base, tokenizer) -> None:
    """Build the Trainer for ``run`` (its output directory a scratch one: it saves nothing)
    and train steps ``run.first`` to ``run.total``; a cancel saves a checkpoint first."""
    import tempfile

    import torch
    from transformers import PrinterCallback

    cfg, dist = run.cfg, run.dist
    with tempfile.TemporaryDirectory(prefix="edge-tune-trainer-") as scratch:
        kw = (preference_args_kwargs if run.preference else training_args_kwargs)(
            cfg, run.total - run.first, scratch, run.precision)
        if not torch.cuda.is_available():  # CPU tests (DDP over gloo instead of NCCL)
            kw.update(use_cpu=True, **({"ddp_backend": "gloo"} if dist.world > 1 else {}))
        args = args_class(**kw)
        trainer = run.trainer = _edge_trainer(trainer_base, run)(
            model=run.model, args=args, callbacks=[_events(run)], **_trainer_inputs(run, tokenizer))
        trainer.remove_callback(PrinterCallback)  # progress goes out as events instead
        if run.preference:
            ref = "; reference = the base (TRL: a frozen copy of the fresh adapter)"
            kto = (f", weights desirable {cfg.desirable_weight:g} / undesirable "
                   f"{cfg.undesirable_weight:g}" if cfg.method == "kto" else "")
            run.emit(Log(f"{cfg.method.upper()} with TRL's {trainer_base.__name__}, beta "
                         f"{cfg.beta}{kto}" + (ref if cfg.method in ("dpo", "kto") else "")))
        run.emit(Log(f"training {run.total} steps: batch {cfg.batch_size} x {grad_accum(cfg)} "
                     f"accumulated, lr {cfg.lr} (warm-up {run.warmup}, cosine to 10%), "
                     f"{run.precision} compute"))
        with checkpoint.saved_on_cancel(run.stop, run.save_on_cancel, run.emit, run.job.run_dir,
                                        finished=lambda: run.done["step"] >= run.total):
            trainer.train()


def train(job: TrainJob | Mapping, emit: Callable) -> WorkerResult:
    """Load the base in 4-bit with Unsloth, add LoRA, train, save the PEFT adapter to
    ``job.adapter_dir``. Runs inside the training subprocess."""
    # Unsloth must be imported before transformers/peft/trl (it patches them): the worker
    # imports it first of all (the registry's ``preload``); here it is only looked up.
    import torch
    import unsloth  # noqa: F401
    from unsloth import FastLanguageModel, is_bfloat16_supported

    job = TrainJob.of(job)
    cfg = job.config
    if not torch.cuda.is_available():
        raise UsageError("torch sees no CUDA device "
                         "(check CUDA_VISIBLE_DEVICES and the driver with nvidia-smi)",
                         setting="backend", value="unsloth")
    bf16_ok = bool(is_bfloat16_supported())
    load_kw = from_pretrained_kwargs(cfg, job.hf_dir, bf16_ok)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one GPU per rank (the worker set it)
        load_kw["device_map"] = {"": local_rank}
    dtype_name = load_kw["dtype"]
    load_kw["dtype"] = getattr(torch, dtype_name) if dtype_name else None
    precision = mixed_precision(dtype_name, bf16_ok)

    emit(Progress("load", 0, None, "", "loading base model in 4-bit (unsloth)"))
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model, _tokenizer = FastLanguageModel.from_pretrained(**load_kw)
    model = FastLanguageModel.get_peft_model(model, **peft_kwargs(cfg))
    gpu = torch.cuda.get_device_name(local_rank)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    emit(Log(f"model loaded in {time.perf_counter() - t0:.1f}s on {gpu}; "
             f"{n_train / 1e6:.2f}M trainable LoRA parameters; 4-bit NF4 base, "
             f"{precision} compute"))

    result = fit(model, job, emit, precision,
                 torch.bfloat16 if precision == "bf16" else torch.float16, _tokenizer)
    # TRL's DPOTrainer may add a frozen "ref" copy of the fresh adapter: save the trained one
    model.save_pretrained(job.adapter_dir, safe_serialization=True,
                          selected_adapters=["default"])
    return dataclasses.replace(result, precision=f"nf4+{precision}", gpu=gpu,
                               peak_vram_bytes=int(torch.cuda.max_memory_allocated()))
