"""LoRA training on the CPU with torch + PEFT: a plain loop, tuned for small models.

Why not ``transformers.Trainer``: on a CPU a few choices matter more than anything else, and a
plain loop makes them easy (``benchmarks/train_throughput.py`` measures the gain):

* frozen base weights are stored in bf16 and every matmul runs under bf16 autocast where the
  CPU does bf16 natively (AVX512-BF16 / AMX): half the memory and ~1.5-3x the speed; the LoRA
  weights and the optimizer stay fp32;
* logits are computed only at positions that carry a loss: about half of chat tokens are
  prompt, and the vocabulary projection (49k words) is a large share of the forward pass;
* batches are grouped by length, so almost no padding is computed;
* eager attention, and no fp32 round trip of activations into the LoRA layers under autocast.

Runs inside the training subprocess (``edge_tune.training.worker``); talks only through ``emit``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

from edge_tune.training import checkpoint
from edge_tune.training.backends import attention
from edge_tune.training.job import TrainJob, WorkerResult, as_config
from edge_tune.training.loop import (  # noqa: F401 (length_grouped_batches, lr_at: re-exported)
    Distributed,
    eval_steps,
    final_loss,
    grad_accum,
    length_grouped_batches,
    lr_at,
    pair_means,
    preference_line,
    slot_orders,
    step_counts,
    torch_optimizer,
)
from edge_tune.config import ALL_LINEAR, TrainConfig
from edge_tune.data.template import IGNORE, Example
from edge_tune.events import Log, Metric, Progress


def collate(examples: list[Example], pad_id: int, multiple: int = 1):
    """(ids, labels, attention mask), right-padded to the longest example rounded up to
    ``multiple``; padding carries no loss."""
    import torch

    width = multiple * math.ceil(max(len(e.input_ids) for e in examples) / multiple)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return ids, labels, mask


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into as few rows of at most ``capacity`` tokens as first-fit
    decreasing finds, then spread the examples evenly over those rows (longest first, each into
    the emptiest row) when that still fits: a batch is as wide as its fullest row, so even rows
    mean less padding and shorter attention. An example longer than ``capacity`` gets a row of
    its own. Pure."""
    rows: list[list[int]] = []
    room: list[int] = []
    by_length = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    for i in by_length:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    even: list[list[int]] = [[] for _ in rows]
    fill = [0] * len(rows)
    for i in by_length:
        r = min(range(len(fill)), key=fill.__getitem__)
        even[r].append(i)
        fill[r] += lengths[i]
    fits = all(f <= capacity or len(row) == 1 for f, row in zip(fill, even))
    if fits and max(fill) < capacity - min(room):
        return even
    return rows


def collate_packed(examples: list[Example], pad_id: int, capacity: int):
    """Pack a batch into as few rows as fit ``capacity`` tokens, attention kept inside each
    example: a block-diagonal causal mask and positions restarting at 0 per example. Returns
    (ids, labels, 4-D additive mask, position_ids, real token count)."""
    import torch

    rows = pack_rows([len(e.input_ids) for e in examples], capacity)
    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row):
            e, n = examples[i], len(examples[i].input_ids)
            ids[r, at:at + n] = torch.tensor(e.input_ids)
            labels[r, at:at + n] = torch.tensor(e.labels)
            labels[r, at] = IGNORE  # nothing predicts an example's first token from the last one
            positions[r, at:at + n] = torch.arange(n)
            segment[r, at:at + n] = seg
            at += n
    same = segment[:, :, None] == segment[:, None, :]
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    allowed = (same & causal) | torch.eye(width, dtype=torch.bool)  # pads see only themselves
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(
        ~allowed, torch.finfo(torch.float32).min)[:, None]
    return ids, labels, mask, positions, int((segment >= 0).sum())


def use_bf16(precision: str, cpu_has_bf16: bool) -> bool:
    return precision == "bf16" or (precision == "auto" and cpu_has_bf16)


def peft_lora_kwargs(cfg: TrainConfig | Mapping) -> dict:
    """``peft.LoraConfig`` arguments for the run's LoRA variant (rank, alpha, rsLoRA, DoRA,
    dropout, target modules; ``all-linear`` is PEFT's own keyword). Pure."""
    cfg = as_config(cfg)
    targets = cfg.target_modules
    return {"r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": targets[0] if targets == [ALL_LINEAR] else list(targets),
            "use_rslora": cfg.rslora, "use_dora": cfg.dora}


def build_model(hf_dir: Path, cfg: TrainConfig | Mapping, bf16: bool):
    """The base model with LoRA layers: frozen base in bf16 (or fp32), trainable LoRA in fp32.
    ``cfg``: the run's settings (a mapping may give only rank, alpha, target_modules...).
    With ``cfg.full``: the plain model, every weight trainable and kept in fp32 (AdamW's
    master copy; bf16 compute comes from autocast), no LoRA layers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = as_config(cfg)
    model_type = AutoConfig.from_pretrained(str(hf_dir)).model_type
    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.bfloat16 if bf16 and not cfg.full else torch.float32,
        # Eager attention: on CPU, SDPA's flash-attention backward is ~30% of a training
        # step on short chat sequences; plain matmuls are faster here. edge-tune's variant
        # keeps one copy of the probabilities instead of two (attention.py).
        attn_implementation=attention.implementation(model_type))
    model.config.use_cache = False
    if cfg.grad_checkpoint:
        # Keep only each block's input; recompute the block in backward (non-reentrant, so the
        # frozen embeddings need no requires_grad trick).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.full:
        model.requires_grad_(True)
        return model
    lora = LoraConfig(**peft_lora_kwargs(cfg), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


LOSS_CHUNK = 128  # positions per slice of the vocabulary projection
REWARD_FIELDS = ("reward_margin", "reward_accuracy")  # Metric fields of a preference run


def _chunk_loss_sum(head, hidden, targets, cap):
    import torch.nn.functional as F

    logits = head(hidden)
    if cap:
        logits = (logits / cap).tanh() * cap
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def causal_lm_of(model):
    """The transformers model inside a PEFT model, or ``model`` itself (a full run)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_loss(model, ids, labels, mask, position_ids=None, kl_labels=None,
                  kl_weight: float = 0.0):
    """Mean cross-entropy over trained positions only, plus, with ``kl_weight``,
    ``kl_weight`` x KL(base ‖ tuned) summed over the positions ``kl_labels`` trains (see
    :func:`replay_kl_sum`), divided by the same count of trained positions: a replay token's
    loss is its cross-entropy plus ``kl_weight`` x its KL.

    Hidden states are computed for all tokens, logits only where the next token carries a
    loss, and only ``LOSS_CHUNK`` positions at a time: each slice's logits are recomputed in
    backward instead of kept (a 49k-word vocabulary makes them the largest tensors of a step).
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    causal_lm = causal_lm_of(model)
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    states = decoder(input_ids=ids, attention_mask=mask,
                     position_ids=position_ids).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    hidden, targets = states[:, :-1][keep], targets[keep]
    head = causal_lm.get_output_embeddings()
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, len(targets), LOSS_CHUNK):
        total = total + checkpoint(_chunk_loss_sum, head, hidden[i:i + LOSS_CHUNK],
                                   targets[i:i + LOSS_CHUNK], cap, use_reentrant=False)
    if kl_weight and kl_labels is not None:
        total = total + kl_weight * replay_kl_sum(model, states, ids, mask, position_ids,
                                                  kl_labels)
    return total / max(1, len(targets))


def _chunk_kl_sum(head, base_head, hidden, base_hidden, cap):
    import torch
    import torch.nn.functional as F

    def log_probs(logits):
        if cap:
            logits = (logits / cap).tanh() * cap
        return F.log_softmax(logits.float(), dim=-1)

    with torch.no_grad():
        lp = log_probs(base_head(base_hidden))
    return (lp.exp() * (lp - log_probs(head(hidden)))).sum()


def replay_kl_sum(model, states, ids, mask, position_ids, kl_labels):
    """KL(base ‖ tuned) in nats, summed over the positions that predict a trained token of
    ``kl_labels`` ((batch, width), IGNORE elsewhere), over the full vocabulary: the same
    per-position KL ``edge-tune eval`` measures drift with. ``states``: the tuned model's last
    hidden states of the whole batch ((batch, width, hidden), with gradients); the base's are
    computed here for the rows that have such positions, by the same PEFT model with its
    adapter switched off and without gradients (no second copy of the model). 0 (a float
    tensor) when no row has one."""
    import torch
    from torch.utils.checkpoint import checkpoint

    at = kl_labels[:, 1:] != IGNORE
    rows = at.any(dim=1)
    total = states.new_zeros((), dtype=torch.float32)
    if not bool(rows.any()):
        return total
    causal_lm = causal_lm_of(model)
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    with torch.no_grad(), model.disable_adapter():
        base = decoder(input_ids=ids[rows], attention_mask=mask[rows],
                       position_ids=None if position_ids is None else position_ids[rows]
                       ).last_hidden_state
    base, hidden = base[:, :-1][at[rows]], states[:, :-1][at]  # the same positions, in order
    head = causal_lm.get_output_embeddings()
    # A LoRA layer on the output layer (an untied base): the base's logits without it
    base_head = head.get_base_layer() if hasattr(head, "get_base_layer") else head
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    for i in range(0, len(hidden), LOSS_CHUNK):
        total = total + checkpoint(_chunk_kl_sum, head, base_head, hidden[i:i + LOSS_CHUNK],
                                   base[i:i + LOSS_CHUNK], cap, use_reentrant=False)
    return total


def replay_labels(batch: list[Example], replay: list[bool]) -> list[Example]:
    """``batch`` with the labels of every example that is not replay set to IGNORE: collated
    like the batch itself (the same rows and positions: layout depends on lengths only),
    its trained positions are the replay records' (``kl_labels`` of :func:`response_loss`)."""
    return [e if r else Example(e.input_ids, [IGNORE] * len(e.labels))
            for e, r in zip(batch, replay)]


def compute_precision(model, bf16: bool):
    """bf16 autocast where the CPU has it, without PEFT's fp32 round trip of activations
    into the LoRA layers (the LoRA weights stay fp32 for the optimizer)."""
    import contextlib

    import torch
    from peft.helpers import disable_input_dtype_casting

    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16))
    if hasattr(model, "get_base_model"):  # a full run has no LoRA layers
        stack.enter_context(disable_input_dtype_casting(model, active=bf16))
    return stack


def pair_rows(batch: list, pad_id: int, limit: int | None = None):
    """A batch of preference pairs as one padded batch: chosen sequences, then rejected; a
    KTO batch as its examples, then their KL rows (``preference.kto_rows``, cut to
    ``limit``)."""
    from edge_tune.data.preference import KTOExample, kto_rows

    if batch and isinstance(batch[0], KTOExample):
        return collate(kto_rows(batch, limit), pad_id)
    return collate([e.chosen for e in batch] + [e.rejected for e in batch], pad_id)


def evaluate_pairs(model, examples: list, batch_size: int, pad_id: int, bf16: bool,
                   cfg: TrainConfig) -> tuple[float, float, float]:
    """(mean preference loss, reward margin, reward accuracy) over pairs, no gradients."""
    import torch

    from edge_tune.training.preference_loss import kto_terms, pair_loss

    batches = []
    model.eval()
    with torch.no_grad(), compute_precision(model, bf16):
        for k in range(0, len(examples), batch_size):
            batch = examples[k:k + batch_size]
            out = pair_loss(model, *pair_rows(batch, pad_id, cfg.seq_len), cfg.method,
                            cfg.beta, kto_terms(batch, cfg))
            batches.append((len(batch), (float(out.loss), *out.stats())))
    model.train()
    return pair_means(batches)


def evaluate(model, examples: list[Example], batch_size: int, pad_id: int, bf16: bool) -> float:
    """Mean loss per trained token over ``examples`` (no gradients)."""
    import torch

    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad(), compute_precision(model, bf16):
        for k in range(0, len(order), batch_size):
            ids, labels, mask = collate([examples[i] for i in order[k:k + batch_size]], pad_id)
            n = int((labels[:, 1:] != IGNORE).sum())
            total += response_loss(model, ids, labels, mask).item() * n
            count += n
    model.train()
    return total / max(1, count)


# Files of an HF model directory that are not its weights or config: copied verbatim into a
# full run's model, so llama.cpp's converter sees the tokenizer exactly as the base had it.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json", "generation_config.json")


def save_full_model(model, base_dir: Path, out: Path, chat_template: str | None) -> None:
    """Write a full run's weights as an HF model directory ``out``: ``config.json`` and
    ``model.safetensors`` (fp32, the trained values; tied embeddings stored once) from
    ``save_pretrained``, the base's tokenizer files copied, and ``chat_template``
    (``--chat-template``'s text) as the model's only template when one was given."""
    model.config.use_cache = True  # training turned the KV cache off; inference wants it
    model.save_pretrained(str(out), safe_serialization=True)
    copy_tokenizer(base_dir, out, chat_template)


def copy_tokenizer(base_dir: Path, out: Path, chat_template: str | None) -> None:
    """The base's tokenizer files into a full run's model directory ``out``, and
    ``chat_template`` as its only template when one was given (shared by the mlx backend)."""
    import shutil

    for name in _TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / name)
    if chat_template:
        import json

        # llama.cpp's converter (gguf-py SpecialVocab) and transformers both prefer a template
        # inside tokenizer_config.json over chat_template.jinja: the run's must be the only one
        config_path = out / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config.pop("chat_template", None)
            config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


def train(job: TrainJob | Mapping, emit: Callable) -> WorkerResult:
    """Train a LoRA adapter; save it in PEFT format to ``job.adapter_dir``.

    Reads of ``job``: config, hf_dir, examples (tokenized), example_index, val_examples,
    pad_id, physical_cores, cpu_has_bf16, run_dir, resume_from, interrupt.
    """
    import torch

    job = TrainJob.of(job)
    cfg = job.config
    dist = Distributed()
    # Ranks on one node share its cores: torch's default (all cores each) oversubscribes.
    threads = cfg.threads or max(1, job.physical_cores // dist.local_world)
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    bf16 = use_bf16(cfg.precision, job.cpu_has_bf16)

    emit(Progress("load", 0, None, "", "loading base model"))
    t0 = time.perf_counter()
    model = build_model(Path(job.hf_dir), cfg, bf16)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    what = "parameters (full fine-tuning, fp32 weights)" if cfg.full else "LoRA parameters"
    emit(Log(f"model loaded in {time.perf_counter() - t0:.1f}s; {n_train / 1e6:.2f}M trainable "
             f"{what}; {'bf16' if bf16 else 'fp32'} compute on {threads} threads"))

    examples: list[Example] = job.examples
    accum = grad_accum(cfg)  # micro-batches per optimizer step, per rank
    # A step takes one micro-batch from each of accum x world slots; this rank holds the
    # examples of its own slots only (its shard), each slot with an order that depends on
    # (seed, slot, step) alone: the global batch of one process's run, whatever the world.
    slots = accum * dist.world
    orders = slot_orders(job, accum, dist)
    n_examples = dist.sum_int(len(examples))
    total, steps_per_epoch, warmup = step_counts(cfg, n_examples, dist.world)

    val_examples: list[Example] = job.val_examples
    evals = eval_steps(total, cfg.eval_every) if val_examples else set()
    val_loss = None

    preference = cfg.method != "sft"
    if preference:
        emit(Log(preference_line(cfg)))
    # --replay-kl: the examples of replay records also carry the KL-to-base term
    replayed = set(job.replay_examples) if cfg.replay_kl and not cfg.full else set()
    if replayed:
        emit(Log(f"replay: KL to the base (adapter off) on {len(replayed)} replay examples, "
                 f"weight {cfg.replay_kl:g}"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch_optimizer(cfg, params)
    model.train()
    tokens_done, losses, start, first = 0, [], time.perf_counter(), 0
    if job.resume_from:
        state = checkpoint.restore(Path(job.resume_from), model, opt)
        checkpoint.check_matches(state, total, slots, job.resume_from)
        first, tokens_done, losses = state["step"], state["tokens"], state["losses"]
        val_loss = state.get("val_loss")
        start -= state["train_seconds"]
        emit(Log(f"resumed from the checkpoint at step {first}/{total}"))
    stop = job.interrupt or checkpoint.Interrupt()  # installed by the worker
    save_every = cfg.save_every or 0
    keep = checkpoint.kept_steps(total, save_every, evals) if cfg.save_total_limit else set()

    def save_checkpoint(done: int) -> None:
        # The data order and the LR schedule are pure functions of the step.
        checkpoint.save(Path(job.run_dir), model, opt, {
            "step": done, "total": total, "slots": slots, "tokens": tokens_done,
            "losses": losses, "val_loss": val_loss,
            "train_seconds": time.perf_counter() - start})

    def save_on_cancel():
        # The weights are those after step ``done``: the update is guarded, and forward and
        # backward change none. Rank 0 writes the run directory (all ranks hold the same).
        if dist.rank != 0:
            return None
        save_checkpoint(done)
        return done, total

    done = first
    with checkpoint.saved_on_cancel(stop, save_on_cancel, emit, job.run_dir):
        for step in range(first, total):
            lr = lr_at(step, total, cfg.lr, warmup, schedule=cfg.lr_scheduler)
            for g in opt.param_groups:
                g["lr"] = lr
            step_loss, n_tokens, rewards = _step_gradients(model, job, orders, step, bf16,
                                                           replayed)
            step_loss, n_tokens = dist.average_grads(params, step_loss, n_tokens)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            with stop.guard():  # SIGTERM waits for the update to complete
                opt.step()
                opt.zero_grad(set_to_none=True)
                tokens_done += n_tokens
                losses.append(step_loss)
                done = step + 1

            elapsed = time.perf_counter() - start
            if dist.rank == 0:  # rank 0 reports for all (its token counts are the global ones)
                emit(Metric(step=step + 1, total_steps=total, loss=losses[-1],
                            tokens_per_second=tokens_done / elapsed,
                            eta_seconds=elapsed / (step + 1) * (total - step - 1),
                            learning_rate=lr, epoch=(step + 1) / steps_per_epoch,
                            **(dict(zip(REWARD_FIELDS, rewards)) if preference else {})))
            if step + 1 in evals and dist.rank == 0:  # the others go on to the next step's sync
                t_eval = time.perf_counter()
                val_loss, val_rewards = _validate(model, job, bf16)
                start += time.perf_counter() - t_eval  # tok/s counts training time only
                emit(Metric(step=step + 1, total_steps=total, loss=val_loss, split="val",
                            epoch=(step + 1) / steps_per_epoch, **val_rewards))
            if save_every and (step + 1) % save_every == 0 and step + 1 < total \
                    and dist.rank == 0:
                with stop.guard():
                    save_checkpoint(step + 1)
            if step + 1 in keep and dist.rank == 0:
                with stop.guard():
                    checkpoint.keep_adapter(
                        Path(job.run_dir), step + 1, val_loss if step + 1 in evals else None,
                        cfg.save_total_limit,
                        lambda d: model.save_pretrained(str(d), safe_serialization=True))

    if dist.rank == 0:  # rank 0 writes (all ranks hold the same weights)
        _save_trained(model, job)
    return WorkerResult(
        steps=total,
        final_loss=final_loss(losses),
        val_loss=val_loss,
        tokens=tokens_done,
        tokens_per_second=tokens_done / (time.perf_counter() - start),
        train_seconds=time.perf_counter() - start,
        precision="bf16" if bf16 else "fp32",
        trainable_parameters=n_train,
        losses=[round(x, 6) for x in losses],  # per optimizer step (the loss curve)
        world_size=dist.world,
        examples=n_examples,  # over all ranks' shards
    )


def _step_gradients(model, job: TrainJob, orders: list, step: int, bf16: bool,
                    replayed: set) -> tuple[float, int, list[float]]:
    """Forward and backward passes over this rank's micro-batches of ``step`` (one per slot
    in ``orders``), gradients accumulated. Returns (loss, trained tokens, [reward margin,
    reward accuracy]), loss and rewards as means over the step's micro-batches (rewards 0
    for SFT). ``replayed``: the indices of replay examples, which add the KL-to-base term."""
    cfg = job.config
    accum = grad_accum(cfg)
    step_loss, n_tokens, rewards = 0.0, 0, [0.0, 0.0]
    for batch_at in orders:
        picked = batch_at(step)
        batch = [job.examples[k] for k in picked]
        if cfg.method != "sft":  # DPO/ORPO: chosen and rejected sequences in one batch
            loss, n_micro, stats = _pair_backward(model, job, batch, bf16, accum)
            rewards = [r + v / accum for r, v in zip(rewards, stats)]
        else:
            kl_batch = replay_labels(batch, [k in replayed for k in picked]) \
                if replayed else None
            loss, n_micro = _sft_backward(model, job, batch, kl_batch, bf16, accum)
        step_loss += loss
        n_tokens += n_micro
    return step_loss, n_tokens, rewards


def _pair_backward(model, job: TrainJob, batch: list, bf16: bool,
                   accum: int) -> tuple[float, int, tuple]:
    """The preference loss of one micro-batch of pairs, backward (scaled by ``1/accum``).
    Returns (loss / accum, tokens in the batch, the loss's reward stats)."""
    from edge_tune.training.preference_loss import kto_terms, pair_loss

    cfg = job.config
    ids, labels, mask = pair_rows(batch, job.pad_id, cfg.seq_len)
    with compute_precision(model, bf16):
        out = pair_loss(model, ids, labels, mask, cfg.method, cfg.beta, kto_terms(batch, cfg))
    (out.loss / accum).backward()
    return out.loss.item() / accum, int(mask.sum()), out.stats()


def _sft_backward(model, job: TrainJob, batch: list[Example], kl_batch: list[Example] | None,
                  bf16: bool, accum: int) -> tuple[float, int]:
    """The response loss of one micro-batch (padded, or packed with ``--pack``), plus the KL
    term on the rows of ``kl_batch`` (:func:`replay_labels`), backward (scaled by
    ``1/accum``). Returns (loss / accum, tokens in the batch)."""
    cfg = job.config
    kl_labels = None
    if cfg.pack:
        # Rows no wider than the batch's longest example: packing then only joins
        # examples that fit beside each other, and never widens the attention
        # (quadratic in the row) beyond what padding would compute.
        width = max(len(e.input_ids) for e in batch)
        ids, labels, mask, positions, n_micro = collate_packed(batch, job.pad_id, width)
        if kl_batch:
            kl_labels = collate_packed(kl_batch, job.pad_id, width)[1]
    else:
        (ids, labels, mask), positions = collate(batch, job.pad_id), None
        n_micro = int(mask.sum())
        if kl_batch:
            kl_labels = collate(kl_batch, job.pad_id)[1]
    with compute_precision(model, bf16):
        loss = response_loss(model, ids, labels, mask, positions, kl_labels,
                             cfg.replay_kl) / accum
    loss.backward()
    return loss.item(), n_micro


def _validate(model, job: TrainJob, bf16: bool) -> tuple[float, dict]:
    """(validation loss, reward fields: empty for SFT) over ``job.val_examples``."""
    cfg = job.config
    if cfg.method != "sft":
        val_loss, *val_stats = evaluate_pairs(model, job.val_examples, cfg.batch_size,
                                              job.pad_id, bf16, cfg)
        return val_loss, dict(zip(REWARD_FIELDS, val_stats))
    return evaluate(model, job.val_examples, cfg.batch_size, job.pad_id, bf16), {}


def _save_trained(model, job: TrainJob) -> None:
    """The trained result in ``job.adapter_dir``: the whole model in the HF layout for
    ``--full``, else the PEFT adapter."""
    out = Path(job.adapter_dir)
    if job.config.full:
        save_full_model(model, Path(job.hf_dir), out, job.chat_template)
    else:
        model.save_pretrained(str(out), safe_serialization=True)
