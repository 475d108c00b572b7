"""Before training: how much memory and time a run needs, and settings that fit.

Pure arithmetic over a model's shape and the run's settings, so it is instant, needs no
torch/mlx/unsloth, and is easy to test. The memory model counts what each backend keeps:

* the framework itself (Python + torch/mlx + transformers after import);
* frozen weights at their precision (bf16 where the CPU does bf16, fp32 otherwise; 4-bit NF4
  for Unsloth QLoRA) and, while loading, the fp32 safetensors file mapped into memory;
* LoRA weights, their gradients and AdamW's two moments (fp32: 16 bytes per parameter); a
  full fine-tune (``full``) has them for every weight instead (plus a bf16 copy under
  bf16 autocast), and computes weight gradients too (6 FLOPs per weight and token, not 4);
* activations kept for the backward pass: per token per block a fixed number of hidden- and
  FFN-sized tensors, plus the attention probabilities (B x heads x L x L, eager attention),
  or only each block's input with gradient checkpointing;
* the loss, computed ``LOSS_CHUNK`` positions at a time over the vocabulary;
* after training, ``verify`` (on by default) in the command's own process: the fp32 model in
  torch, then llama.cpp's F32 copy (one at a time), and the logits it keeps (see
  :func:`verify_bytes`).

The per-token coefficients are counted from the Llama block (see ``_block_activation_bytes``)
and checked against measured peak RSS (``benchmarks/planner_check.py``; table in the README).
Time per step comes from a throughput table measured on this project's machines (FLOP/s per
core for the CPU backends; a fraction of the GPU's bf16 peak for Unsloth) and is a rough guide.

:func:`fit_plan` feeds it: the model's shape read from its GGUF header or ``config.json``, and
this machine's free memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from edge_tune.training.registry import capabilities
from edge_tune.config import TrainConfig
from edge_tune.errors import UsageError

if TYPE_CHECKING:
    from edge_tune.models import ModelRef

GIB = 1024 ** 3
LOSS_CHUNK = 128  # matches edge_tune.training.backends.cpu.LOSS_CHUNK
VERIFY_CHUNK = 1 << 21  # matches edge_tune.verify.CHUNK_ELEMENTS

# Measured: resident memory of the training process after importing its libraries and before
# loading a model (Python, torch/mlx, transformers, tokenizers, the job's data).
FRAMEWORK_BYTES = {"cpu": 0.62 * GIB, "mlx": 0.5 * GIB, "unsloth": 1.0 * GIB}
# Measured: peak RSS exceeds the per-token activations counted in ``_block_activation_bytes``
# by this factor (allocator high-water marks and autograd's transient buffers in backward).
# Fitted with FRAMEWORK_BYTES on the first four rows of benchmarks/planner_check.py; the
# other rows are out of sample.
ACTIVATION_OVERHEAD = 1.7
# Measured: with gradient checkpointing on the cpu backend, peak RSS holds about five blocks'
# activations beyond the kept block inputs, not the two that are live at once (the recomputed
# block and its gradients): each block's recompute-and-free churns glibc's heap, which keeps
# the freed blocks (README, Speed). Fitted on planner_check's "b8 L512 --grad-checkpoint" row;
# its "b4 L1024 --grad-checkpoint" row is out of sample.
CPU_CHECKPOINT_BLOCKS = 5
# Measured training throughput, as effective FLOP/s per physical core (CPU backends) or as a
# share of the GPU's dense bf16 peak (Unsloth). FLOPs per token = 4 x parameters (forward and
# the input-gradient half of backward; frozen weights need no weight gradients).
CPU_FLOPS_PER_CORE = {"bf16": 60e9, "fp32": 35e9}
MLX_CPU_FLOPS_PER_CORE = 3e9
MLX_METAL_FLOPS = 2.5e12  # a rough figure for an M-series GPU; not measured by this project
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                 "A10": 125e12, "4090": 165e12, "3090": 71e12, "T4": 65e12, "V100": 125e12}
GPU_EFFICIENCY = 0.25
# GRPO's rollouts in llama.cpp: each sequence's prompt evaluated (2 FLOPs per weight and
# token), then decode steps of all completions at once; a step costs about 2 FLOPs per
# weight and sequence at the CPU's fp32 rate, plus this fixed time per step (graph, sampling
# in Python); the adapter's GGUF written and swapped in once per step. Measured on
# SmolLM2-135M, 2 threads, 4 x (41 + 16) tokens: 0.6 s prompts + 0.035 s per decode step
ROLLOUT_STEP_SECONDS = 0.02
ADAPTER_SWAP_SECONDS = 0.5
# The check ``train`` and ``export`` run (edge_tune.verify.verify_hook): held-back
# prompts, tokens of each compared, tokens generated.
VERIFY_PROMPTS, VERIFY_LEN, VERIFY_NEW = 2, 64, 8
# Measured (docs/performance.md, "verify's memory"): verify's resident memory beyond the
# framework, the fp32 weights and the logits it keeps: llama.cpp's library, context and
# compute buffers, tokenizer, torch's allocator keeping freed blocks.
VERIFY_EXTRA_BYTES = 0.1 * GIB


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool = True
    file_bytes: int = 0  # size of the weights file training loads (0 = 4 bytes per parameter)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def params(self) -> int:
        h, f = self.hidden, self.ffn
        block = h * self.q_dim * 2 + h * self.kv_dim * 2 + 3 * h * f + 2 * h
        embed = self.vocab * h * (1 if self.tied else 2)
        return embed + self.layers * block + h

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each LoRA-able projection in a block."""
        h, f = self.hidden, self.ffn
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, f), "up_proj": (h, f),
                "down_proj": (f, h)}


def shape_from_hf_config(config: dict, file_bytes: int = 0) -> ModelShape:
    """From a transformers ``config.json`` dict. Pure."""
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return ModelShape(
        hidden=hidden, layers=int(config["num_hidden_layers"]), heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        ffn=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
        tied=bool(config.get("tie_word_embeddings", False)), file_bytes=file_bytes)


def shape_from_gguf_fields(arch: str, fields: dict, vocab: int, tied: bool) -> ModelShape:
    """From GGUF metadata (``{arch}.embedding_length`` ...). Pure."""
    heads = int(fields[f"{arch}.attention.head_count"])
    hidden = int(fields[f"{arch}.embedding_length"])
    head_dim = int(fields.get(f"{arch}.attention.key_length") or hidden // heads)
    shape = ModelShape(hidden=hidden, layers=int(fields[f"{arch}.block_count"]), heads=heads,
                       kv_heads=int(fields.get(f"{arch}.attention.head_count_kv") or heads),
                       head_dim=head_dim, ffn=int(fields[f"{arch}.feed_forward_length"]),
                       vocab=vocab, tied=tied)
    # Training reads the dequantized fp32 copy (untied embeddings stored twice).
    return dataclasses.replace(shape, file_bytes=4 * shape.params)


@dataclass
class Estimate:
    backend: str
    precision: str
    parts: dict[str, float]  # bytes, by what holds them (at the training peak)
    load_peak: float  # bytes while loading weights
    peak: float  # bytes: the larger of the load and training peaks
    tokens_per_step: int
    seconds_per_step: float
    total_steps: int
    output_bytes: dict = field(default_factory=dict)  # what the run writes (see output_bytes)
    trained_params: int = 0  # weights the optimizer updates (LoRA's, or all of them)
    # bytes: verify after training, in host memory (0: --no-verify); in ``peak`` unless the
    # run trains on a CUDA GPU (whose memory is the budget)
    verify_peak: float = 0.0

    @property
    def total_seconds(self) -> float:
        return self.seconds_per_step * self.total_steps

    def to_dict(self) -> dict:
        return {"backend": self.backend, "precision": self.precision,
                "trained_parameters": self.trained_params,
                "parts_gib": {k: round(v / GIB, 3) for k, v in self.parts.items()},
                "load_peak_gib": round(self.load_peak / GIB, 3),
                "verify_peak_gib": round(self.verify_peak / GIB, 3),
                "peak_gib": round(self.peak / GIB, 3),
                "tokens_per_step": self.tokens_per_step,
                "seconds_per_step": round(self.seconds_per_step, 3),
                "total_steps": self.total_steps,
                "total_seconds": round(self.total_seconds, 1),
                "output_gib": {k: round(v / GIB, 4) for k, v in self.output_bytes.items()}}


@dataclass
class Machine:
    """What the estimate runs on: cores, bf16 support, GPU name, the memory budget."""
    budget_bytes: float
    physical_cores: int = 1
    cpu_bf16: bool = False
    apple: bool = False
    gpu_name: str = ""


@dataclass
class Plan:
    estimate: Estimate
    config: TrainConfig  # the settings to train with (maybe changed)
    changes: list[str] = field(default_factory=list)
    fits: bool = True
    budget_bytes: float = 0.0

    def to_dict(self) -> dict:
        return {"fits": self.fits, "budget_gib": round(self.budget_bytes / GIB, 3),
                "estimate": self.estimate.to_dict(), "changes": self.changes,
                "settings": {k: getattr(self.config, k) for k in
                             ("batch_size", "grad_accum", "seq_len", "grad_checkpoint")}}


def _targeted(shape: ModelShape, targets: list[str]) -> dict[str, tuple[int, int]]:
    dims = shape.module_dims()
    return dims if "all-linear" in targets else {k: v for k, v in dims.items() if k in targets}


def lora_params(shape: ModelShape, rank: int, targets: list[str], dora: bool = False) -> int:
    """Trainable parameters: A and B of each targeted projection (DoRA adds a magnitude per
    output row)."""
    dims = _targeted(shape, targets)
    per_block = sum(rank * (i + o) + (o if dora else 0) for i, o in dims.values())
    return per_block * shape.layers


def dora_flops(shape: ModelShape, rank: int, targets: list[str]) -> float:
    """DoRA's extra work per micro-batch: each forward forms W + scale*B*A (rank x in x out
    multiply-adds) to take its row norms, and backward goes through it again."""
    return 3 * 2.0 * rank * shape.layers * sum(i * o for i, o in _targeted(shape, targets).values())


def _block_activation_bytes(shape: ModelShape, tokens: int, batch: int, length: int,
                            width: int, probs_bytes: int) -> float:
    """Bytes one Llama block keeps for backward (eager attention, autocast at ``width`` bytes).

    Counted per token: two RMS norms each keep their fp32 input (4h) and their output (h);
    the q/k/v input is shared (h); q and k after rope (h + kv); k and v repeated to all heads
    for grouped-query attention (2h); the attention output / o_proj input (h); the residual
    (h); the MLP keeps the gate and up outputs, SiLU(gate) and the down input (4 x ffn).
    Per sequence: ``probs_bytes`` per head per position pair for the attention probabilities
    (transformers' eager attention keeps fp32 ones and their cast copy, 4 + width bytes; the
    cpu backend's own attention keeps one copy, width bytes: training/backends/attention.py).
    """
    h, f, kv = shape.hidden, shape.ffn, shape.kv_dim
    per_token = 2 * 4 * h + width * (2 * h + h + (h + kv) + 2 * h + h + h + 4 * f)
    attention = batch * shape.heads * length * length * probs_bytes
    return tokens * per_token * ACTIVATION_OVERHEAD + attention


def estimate(shape: ModelShape, backend: str, cfg: TrainConfig, machine: Machine,
             total_steps: int = 1, longest: Optional[int] = None) -> Estimate:
    """Peak memory and time per step of one run. ``longest``: the longest example in tokens
    (None = assume examples fill ``seq_len``). Pure."""
    method = cfg.method
    prompt = max(1, min(cfg.seq_len - cfg.max_completion_length, longest or cfg.seq_len))
    if method == "grpo":  # a prompt and its completion; batch_size counts completions
        longest = min(cfg.seq_len, (longest or cfg.seq_len) + cfg.max_completion_length)
    length = min(cfg.seq_len, longest or cfg.seq_len)
    # DPO/ORPO: a chosen and a rejected sequence per example, not packed; DPO adds a forward
    # pass of the reference (the base: adapter off, no gradients), as --replay-kl does (counted
    # for every row: a batch may be all replay). KTO: its examples and as many KL rows
    # (prompts with another example's answer; forward only), and the reference pass on both
    batch = cfg.batch_size * (1 if method in ("sft", "grpo") else 2)
    tokens = batch * length
    full = cfg.full
    n_lora = 0 if full else lora_params(shape, cfg.rank, cfg.target_modules, cfg.dora)
    # Unsloth QLoRA always loads the base in 4-bit NF4 (backends.unsloth.from_pretrained_kwargs)
    four_bit = backend == "unsloth"
    if four_bit:
        precision, weight_bytes, width = "nf4", 0.55, 2
    elif backend == "mlx":
        precision, weight_bytes, width = "fp32", 4.0, 4
    else:
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and machine.cpu_bf16)
        precision, weight_bytes, width = ("bf16", 2.0, 2) if bf16 else ("fp32", 4.0, 4)

    embed_params = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    # Quantized backends keep embeddings and norms in 16-bit.
    weights = (shape.params - embed_params) * weight_bytes + embed_params * \
        (2.0 if four_bit else weight_bytes)
    n_trained = n_lora
    if full:
        # Every weight trains: an fp32 master copy, its fp32 gradient and AdamW's two fp32
        # moments; under bf16 autocast torch also caches a bf16 copy of each weight it casts.
        n_trained = shape.params
        weights = 4.0 * shape.params + (2.0 * shape.params if weight_bytes == 2.0 else 0.0)
    att_batch, att_len = batch, length
    if cfg.pack and capabilities(backend).packs_batches and method == "sft":  # rows <= the longest example
        att_len = min(length, tokens)
        att_batch = math.ceil(tokens / att_len)
    probs_bytes = width if backend == "cpu" else 4 + width
    block = _block_activation_bytes(shape, tokens, att_batch, att_len, width, probs_bytes)
    if cfg.grad_checkpoint or backend == "unsloth":
        in_flight = CPU_CHECKPOINT_BLOCKS if backend == "cpu" else 2
        activations = shape.layers * tokens * shape.hidden * width + in_flight * block
    else:
        activations = shape.layers * block + block  # + the gradients of one block in flight
    rows = min(LOSS_CHUNK, tokens)
    parts = {
        "framework": FRAMEWORK_BYTES.get(backend, FRAMEWORK_BYTES["cpu"]),
        "weights": weights,
        "adapter weights": 4.0 * n_lora,  # LoRA's A and B in fp32 (none in a full run)
        "gradients": 4.0 * n_trained,
        "optimizer state": 8.0 * n_trained,  # AdamW: two fp32 moments per trained weight
        "activations": activations,
        # --replay-kl: a slice of the KL term holds both models' log-probabilities too
        "loss": (5 if cfg.replay_kl else 3) * rows * shape.vocab * 4 +
        tokens * shape.hidden * 4 +
        # GRPO: the completions' log-softmax over the vocabulary, policy and reference
        (3 * cfg.batch_size * cfg.max_completion_length * shape.vocab * 4
         if method == "grpo" else 0),
    }
    train_peak = sum(parts.values())
    file_bytes = shape.file_bytes or 4 * shape.params
    load_peak = parts["framework"] + file_bytes + weights if backend != "unsloth" else 0.0
    # forward 2, input gradients 2, and (full) weight gradients 2 FLOPs per weight and token
    flops = (6.0 * shape.params if full else 4.0 * (shape.params + n_lora)) * tokens + \
        4.0 * shape.layers * att_batch * att_len * att_len * shape.q_dim + \
        (dora_flops(shape, cfg.rank, cfg.target_modules) if cfg.dora else 0.0) + \
        (2.0 * shape.params * tokens if method in ("dpo", "kto") or cfg.replay_kl or
         (method == "grpo" and cfg.beta) else 0.0) - \
        (shape.params * tokens if method == "kto" else 0.0)  # KTO's KL rows: no backward
    verify_peak = verify_bytes(shape, backend) if cfg.verify else 0.0
    # verify runs on the CPU: in the same memory as training except on a CUDA GPU's
    in_budget = verify_peak if capabilities(backend).device != "cuda" else 0.0
    return Estimate(backend=backend, precision=precision, parts=parts,
                    load_peak=load_peak, peak=max(train_peak, load_peak, in_budget),
                    verify_peak=verify_peak,
                    output_bytes=output_bytes(shape, n_lora, full), trained_params=n_trained,
                    tokens_per_step=tokens * cfg.grad_accum,
                    seconds_per_step=cfg.grad_accum * flops / _flops_per_second(
                        backend, precision, machine, cfg.grad_checkpoint) +
                    (_rollout_seconds(shape, cfg, machine, prompt) if method == "grpo"
                     else 0.0),
                    total_steps=total_steps)


def verify_bytes(shape: ModelShape, backend: str = "cpu", n_prompts: int = VERIFY_PROMPTS,
                 max_len: int = VERIFY_LEN, max_new: int = VERIFY_NEW) -> float:
    """Peak resident bytes of ``verify`` (edge_tune.verify.verify_run) on a model of this
    shape: the framework; the fp32 weights, held by one engine at a time (torch's model is
    freed before llama.cpp loads its F32 copy; mlx holds the base and the tuned model at once);
    the float32 logits kept, torch's base and tuned ones per prompt and the F32 base's for a
    merged file (3 x prompts x ``max_len`` rows of the vocabulary); llama.cpp's output rows
    (its buffer, llama-cpp-python's scores for two sequences, the copy: 4 x its context); the
    comparison's float64 chunks; ``VERIFY_EXTRA_BYTES``. Pure."""
    row = 4.0 * shape.vocab
    weights = 4.0 * shape.params * (2 if backend == "mlx" else 1)
    kept = 3 * n_prompts * max_len * row
    engine = 4 * (max_len + 8 + max_new) * row
    comparison = 6 * VERIFY_CHUNK * 8.0
    return (FRAMEWORK_BYTES["cpu"] + weights + kept + engine + comparison +
            VERIFY_EXTRA_BYTES)


def output_bytes(shape: ModelShape, n_lora: int, full: bool) -> dict[str, float]:
    """Bytes a run writes. LoRA: the PEFT adapter (safetensors, fp32) and ``adapter.gguf``
    (F32), run on the base. Full: the trained HF weights (safetensors, fp32) and
    ``model.gguf`` (F16), a whole model. Pure."""
    if full:
        return {"training format": 4.0 * shape.params, "gguf": 2.0 * shape.params}
    return {"training format": 4.0 * n_lora, "gguf": 4.0 * n_lora}


def disk_bytes(outputs: dict[str, float], full: bool, periodic: bool = True
               ) -> dict[str, float]:
    """Bytes a run needs free in its folder at its fullest, from :func:`output_bytes`, with
    the parts it writes: ``weights`` (the trained adapter or model), ``checkpoint`` (those
    weights and AdamW's two moments: 3x) and ``gguf``. ``total`` is the largest of: two
    checkpoints while a periodic save (``periodic``) replaces the last one; the checkpoint
    beside the saved weights at the end of training; the weights, the GGUF and, for a full
    run, the F32 conversion it is quantized from. Pure."""
    weights, gguf = outputs["training format"], outputs["gguf"]
    checkpoint = 3.0 * weights
    total = max(checkpoint * (2 if periodic else 1), checkpoint + weights,
                weights + gguf + (weights if full else 0.0))
    return {"weights": weights, "checkpoint": checkpoint, "gguf": gguf, "total": total}


def _rollout_seconds(shape: ModelShape, cfg: TrainConfig, machine: Machine,
                     prompt: int) -> float:
    """GRPO: llama.cpp sampling one step's completions (all at once, ``batch_size x
    grad_accum`` of them, each after its ``prompt`` tokens), in seconds, roughly. Pure."""
    sequences = cfg.batch_size * cfg.grad_accum
    rate = _flops_per_second("cpu", "fp32", machine, False)
    prompts = 2.0 * shape.params * sequences * prompt / rate
    per_step = 2.0 * shape.params * sequences / rate
    return ADAPTER_SWAP_SECONDS + prompts + \
        cfg.max_completion_length * (per_step + ROLLOUT_STEP_SECONDS)


def minutes_text(seconds: float) -> str:
    """"~N min", rounded up: a run of a few seconds reads "~1 min", never "~0 min"."""
    return f"~{math.ceil(seconds / 60 - 1e-9) if seconds > 0 else 0} min"


def _flops_per_second(backend: str, precision: str, machine: Machine, checkpointing: bool) -> float:
    if backend == "unsloth":
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in machine.gpu_name), 50e12)
        return peak * GPU_EFFICIENCY
    if backend == "mlx":
        return MLX_METAL_FLOPS if machine.apple else MLX_CPU_FLOPS_PER_CORE * machine.physical_cores
    rate = CPU_FLOPS_PER_CORE["bf16" if precision == "bf16" else "fp32"] * machine.physical_cores
    return rate / (1.33 if checkpointing else 1.0)  # recomputing the forward pass


def fit(shape: ModelShape, backend: str, cfg: TrainConfig, machine: Machine,
        total_steps: int = 1, longest: Optional[int] = None) -> Plan:
    """Settings that fit ``machine.budget_bytes``, changing as little as possible, in order:
    smaller batches with more gradient accumulation (same effective batch), gradient
    checkpointing (CPU), then a shorter ``seq_len``. ``Plan.config`` is ``cfg`` with those
    changes; ``Plan.fits`` is False when nothing fits. With ``cfg.exact`` only gradient
    checkpointing may change: UsageError where the batch settings would have to. Pure."""
    changes: list[str] = []

    def est() -> Estimate:
        return estimate(shape, backend, cfg, machine, total_steps, longest)

    e = est()
    # no training setting shrinks the weights' load, nor verify after training
    verify = e.verify_peak if capabilities(backend).device != "cuda" else 0.0
    if max(e.load_peak, verify) > machine.budget_bytes:
        return Plan(e, cfg, changes, fits=False, budget_bytes=machine.budget_bytes)
    while e.peak > machine.budget_bytes:
        if cfg.batch_size > 1 and not cfg.exact:
            old = (cfg.batch_size, cfg.grad_accum)
            cfg = dataclasses.replace(cfg, batch_size=math.ceil(cfg.batch_size / 2),
                                      grad_accum=cfg.grad_accum * 2)
            changes.append(f"batch size {old[0]} -> {cfg.batch_size} with gradient "
                           f"accumulation {old[1]} -> {cfg.grad_accum} (same effective batch)")
        elif backend == "cpu" and not cfg.grad_checkpoint:
            cfg = dataclasses.replace(cfg, grad_checkpoint=True)
            changes.append("gradient checkpointing on (recomputes each block in backward: "
                           "~1/3 slower)")
        elif cfg.exact:
            _refuse_exact(cfg, e, machine.budget_bytes)
        elif cfg.seq_len > 64 and (longest is None or longest > 64):
            new = max(64, min(cfg.seq_len, longest or cfg.seq_len) // 2)
            changes.append(f"seq-len {cfg.seq_len} -> {new} (longer examples are truncated)")
            cfg = dataclasses.replace(cfg, seq_len=new)
        else:
            return Plan(e, cfg, changes, fits=False, budget_bytes=machine.budget_bytes)
        e = est()
    return Plan(e, cfg, changes, fits=True, budget_bytes=machine.budget_bytes)


def _refuse_exact(cfg: TrainConfig, e: Estimate, budget: float) -> None:
    """``--exact``: the batch settings as given do not fit, and the planner may not change
    them: UsageError naming what they need."""
    raise UsageError(f"batch size {cfg.batch_size}, grad-accum {cfg.grad_accum} and seq-len "
                     f"{cfg.seq_len} need ~{e.peak / GIB:.2f} GiB at the peak but "
                     f"{budget / GIB:.2f} GiB is available, and --exact keeps them: lower "
                     "them yourself, raise --memory-gib, or drop --exact to let the planner "
                     "fit them", setting="exact")


def step_report(cfg: TrainConfig) -> dict:
    """The LoRA update's effective step size (lr x alpha/r), and edge-tune's default's: a
    recipe's lr copied without its alpha and rank changes it, silently otherwise. Keys: lr,
    alpha, rank, rslora, step_size, default_step_size."""
    from edge_tune.config_aliases import step_size

    ours = TrainConfig()
    return {"lr": cfg.lr, "alpha": cfg.alpha, "rank": cfg.rank, "rslora": cfg.rslora,
            "step_size": step_size(cfg.lr, cfg.alpha, cfg.rank, cfg.rslora),
            "default_step_size": step_size(ours.lr, ours.alpha, ours.rank)}


def describe(plan: Plan) -> str:
    """One line for logs: peak memory against the budget, time, what changed."""
    e = plan.estimate
    line = (f"plan: peak ~{e.peak / GIB:.2f} GiB of {plan.budget_bytes / GIB:.1f} GiB budget "
            f"({e.backend}, {e.precision}); ~{e.seconds_per_step:.1f}s/step, "
            f"{minutes_text(e.total_seconds)} for {e.total_steps} steps")
    if plan.changes:
        line += "; changed: " + "; ".join(plan.changes)
    return line

# --- fitting a run on this machine: the model's shape read from its files, the free memory ---

PLANNED = ("batch_size", "grad_accum", "seq_len", "grad_checkpoint")  # what the planner may change


def model_shape(ref: "ModelRef") -> Optional[ModelShape]:
    """The planner's view of a model (its shape), from GGUF metadata or config.json; None when
    it cannot be read (an unknown layout: no plan rather than a wrong one)."""
    if ref.gguf is not None:
        from edge_tune.converters.formats.base_info import field_value
        from edge_tune.converters.formats.gguf_header import ArrayLen, read_header

        # the header walk, not GGUFReader: that builds every vocabulary string (seconds)
        reader = read_header(ref.gguf)
        arch = field_value(reader, "general.architecture")
        # a per-layer array (heads per block) is read as its length: no single figure, so it
        # fails int() below like a foreign layout does, and there is no plan rather than a
        # wrong one
        fields = {k: object() if isinstance(f.value, ArrayLen) else f.value
                  for k, f in reader.fields.items() if k.startswith(arch + ".")}
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = fields.get(f"{arch}.vocab_size") or (len(tokens.value) if tokens else 0)
        tied = all(t.name != "output.weight" for t in reader.tensors)
        try:
            return shape_from_gguf_fields(arch, fields, int(vocab), tied)
        except (KeyError, TypeError, ValueError):
            return None
    if ref.hf_dir is not None and (Path(ref.hf_dir) / "config.json").is_file():
        config = json.loads((Path(ref.hf_dir) / "config.json").read_text())
        size = sum(f.stat().st_size for f in Path(ref.hf_dir).glob("*.safetensors"))
        try:
            return shape_from_hf_config(config.get("text_config", config), size)
        except (KeyError, TypeError, ValueError):
            return None
    return None


def _longest_tokens(records: list[dict]) -> int:
    """A cautious guess of the longest example in tokens without tokenizing: ~3 characters per
    token plus the chat template's markers. Pure."""
    longest = 0
    for r in records:
        msgs = r.get("messages") or []
        chars = len(r.get("text") or "") + sum(len(str(m.get("content") or "")) for m in msgs)
        longest = max(longest, chars // 3 + 8 * len(msgs) + 8)
    return longest


def fit_plan(cfg: TrainConfig, ref: "ModelRef", backend: str, hw,
             train_records: list) -> Optional[Plan]:
    """The plan (:func:`fit`) for this run on this machine (``hw``: a ``hardware.Hardware``
    probe): the memory budget is ``cfg.memory_gib``, else what is free (the smallest used
    GPU's on CUDA, 90 % of available RAM split over ``cfg.nproc`` ranks otherwise); steps
    come from ``train_records`` (job records) and the batch settings. None when the model's
    shape cannot be read."""
    import psutil

    shape = model_shape(ref)
    if shape is None:
        return None
    nproc = max(1, cfg.nproc)
    if capabilities(backend).device == "cuda" and hw.cuda_gpus:
        # One rank per GPU: each plans against its own card (the smallest of those used).
        free = min((g.vram_free_gib or g.vram_gib)
                   for g in hw.cuda_gpus[:nproc])
        budget = cfg.memory_gib * GIB if cfg.memory_gib else free * GIB
    else:
        # The planner is per process: with --nproc N each rank holds a full copy of the model
        # on this node, so each gets 1/N of the memory (leaving room for the rest of the box).
        budget = (cfg.memory_gib * GIB if cfg.memory_gib
                  else psutil.virtual_memory().available * 0.9) / nproc
    machine = Machine(budget_bytes=budget, physical_cores=max(1, hw.physical_cores // nproc),
                      cpu_bf16=hw.has_bf16_cpu, apple=hw.apple is not None,
                      gpu_name=hw.cuda_gpus[0].name if hw.cuda_gpus else "")
    per_step = cfg.batch_size * cfg.grad_accum * nproc * max(1, cfg.nnodes)
    steps = cfg.max_steps or max(1, round(cfg.epochs * math.ceil(len(train_records) / per_step)))
    return fit(shape, backend, cfg, machine, steps, _longest_tokens(train_records) or None)


def check_plan(p: Plan) -> None:
    """Raise EdgeTuneError (UsageError for ``--full``) when the plan does not fit in memory
    even at its smallest, naming what to change."""
    if p.fits:
        return
    e = p.estimate
    have = f"but {p.budget_bytes / GIB:.2f} GiB is available"
    if p.config.full:
        state = ("weights", "gradients", "optimizer state")
        fixed = ", ".join(f"{k} {e.parts[k] / GIB:.2f}" for k in state)
        need = sum(e.parts[k] for k in state) / GIB
        raise UsageError(f"full fine-tuning needs {need:.2f} GiB for weights, "
                         f"gradients and optimizer state alone ({fixed} GiB), ~{e.peak / GIB:.2f}"
                         f" GiB at the peak, {have}; train a LoRA adapter instead (drop --full),"
                         " raise --memory-gib or use a smaller model", setting="full")
    if e.load_peak > p.budget_bytes:
        raise UsageError(f"loading this model for training needs ~{e.load_peak / GIB:.2f} GiB "
                         f"{have}; free memory, raise --memory-gib or use a smaller model")
    if e.verify_peak > p.budget_bytes and e.peak >= e.verify_peak:  # counted (not CUDA)
        raise UsageError(f"verify after training (torch and llama.cpp on held-back prompts) "
                         f"needs ~{e.verify_peak / GIB:.2f} GiB {have}; free memory, pass "
                         "--no-verify, or use a smaller model")
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in e.parts.items())
    raise UsageError(f"this run needs ~{e.peak / GIB:.2f} GiB ({parts} GiB) even at batch "
                     f"size 1 with gradient checkpointing and seq-len {p.config.seq_len}, "
                     f"{have}; free memory or use a smaller model")
