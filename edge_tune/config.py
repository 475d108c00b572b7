"""Run configuration: defaults, a TOML file, then command-line flags, validated in one place."""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

from edge_tune.errors import EdgeTuneError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ALL_LINEAR = "all-linear"  # target_modules: every linear layer of the blocks
REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")
FULL_LR = 2e-5  # --full's default learning rate (LoRA's: TrainConfig.lr)
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    # one source (a path, folder or NAME[:CONFIG][@SPLIT], optionally *WEIGHT), or a list of
    # them mixed (--data repeated; data = [...] in TOML): edge_tune.data.layouts
    data: Union[str, list] = ""
    model: str = "default"
    backend: str = "auto"
    out: Optional[str] = None
    epochs: float = 2.0
    max_steps: Optional[int] = None  # overrides epochs when set
    lr: float = 1e-3
    rank: int = 16
    alpha: float = 32.0
    rslora: bool = False  # rank-stabilized LoRA: the update is scaled by alpha/sqrt(rank)
    dora: bool = False  # weight-decomposed LoRA (magnitude + direction); exports through --merge
    lora_dropout: float = 0.0  # dropout on the LoRA branch's input while training
    batch_size: int = 8
    grad_accum: int = 1  # micro-batches per optimizer step (the planner raises it to fit)
    grad_checkpoint: bool = False  # recompute each block in backward: less memory, ~1/3 slower
    seq_len: int = 512
    seed: int = 0
    format: str = "auto"  # auto | openai | sharegpt | alpaca | completion | text
    # source column -> edge-tune key, "question=prompt,answer=completion" (hub sets, CSVs)
    columns: Optional[str] = None
    max_samples: Optional[int] = None  # take at most this many records of each source
    # auto | inline | drop: assistant reasoning (reasoning_content / thinking). auto: the
    # chat template must render it (Qwen3 style) or the record is refused; inline: written
    # into the answer between the model's think markers; drop: left out, said once
    reasoning: str = "auto"
    # KTO data (label / kto_tag) under sft/dpo/orpo: train only the desirable (label true)
    # records, the count of the undesirable ones left out said; without it such data is refused
    desirable_only: bool = False
    skip_invalid: bool = False  # skip bad records (reported) instead of stopping
    train_on: str = "assistant"  # assistant | all: which tokens carry the loss
    pack: bool = True  # cpu: pack each batch into few seq_len rows (block-diagonal attention)
    overflow: str = "truncate"  # truncate | drop: examples longer than seq_len
    val: Optional[str] = None  # a separate validation file
    val_split: float = 0.0  # or hold out this share of --data
    eval_every: int = 0  # steps between validation passes; 0 = about 5 over the run
    save_every: int = 50  # steps between checkpoints (RUN/checkpoint); 0 = only on cancel
    # module names inside a block (q_proj, ...), or ["all-linear"]: every linear layer of the
    # blocks (the output layer excluded); checked against the model before its weights load
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    warmup_steps: int = 5
    precision: str = "auto"  # auto | bf16 | fp32
    threads: int = 0  # 0 = physical cores
    memory_gib: Optional[float] = None  # the planner's memory budget; None = what is free now
    verify: bool = True  # after training: llama.cpp vs torch+PEFT on held-back prompts
    nproc: int = 1  # processes per node (torchrun: gloo on CPU, NCCL per GPU for unsloth)
    nnodes: int = 1  # machines; more than one needs rdzv
    rdzv: Optional[str] = None  # HOST:PORT of the rendezvous (torchrun --rdzv-endpoint)
    # A built-in template name (edge_tune.templates.builtin) or a Jinja file, used instead of
    # the model's own; stored in the run and used by chat/serve/export without being given again
    chat_template: Optional[str] = None
    # keep | fold: fold = system text goes into the first user turn (templates without a
    # system role); stored in the run, so chat and serve fold it the same way
    system_mode: str = "keep"
    # tensorboard | wandb | mlflow | none: where the parent also writes the run's metrics
    # (tensorboard: RUN/tb event files; wandb offline unless WANDB_MODE says otherwise)
    report_to: str = "tensorboard"
    # sft | dpo | orpo: supervised fine-tuning, or preference tuning on prompt/chosen/rejected
    # pairs (DPO: Rafailov et al. 2023; ORPO: Hong et al. 2024; cpu backend)
    method: str = "sft"
    beta: float = 0.1  # DPO's beta (strength of the KL to the reference), ORPO's lambda
    # full fine-tuning: every weight trains (AdamW) and the run saves HF safetensors weights
    # instead of a LoRA adapter; LoRA-only settings (rank, alpha, rslora, dora, lora_dropout,
    # target_modules) are refused with it. cpu and mlx backends.
    full: bool = False
    # general replay: this many records of the base model's own answers to general prompts
    # shipped with edge-tune (edge_tune/replay.py) mixed into training, so a narrow fine-tune
    # keeps the base's general behaviour; 0 = none (docs/eval.md, "Forgetting")
    replay: int = 0
    # the weight of a KL(base || tuned) term over the full vocabulary on the replay records'
    # answer tokens (the base = the same model with the adapter off), added to their
    # cross-entropy: it keeps the whole next-token distribution, not only the base's greedy
    # token; 0 = hard labels only. Needs replay; cpu backend (docs/eval.md, "Forgetting")
    replay_kl: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHECKS = {
    "epochs": (lambda v: v > 0, "a number > 0"),
    "max_steps": (lambda v: v is None or v > 0, "an integer > 0"),
    "lr": (lambda v: 0 < v < 1, "a learning rate between 0 and 1"),
    "rank": (lambda v: 1 <= v <= 1024, "an integer from 1 to 1024"),
    "alpha": (lambda v: v > 0, "a number > 0"),
    "batch_size": (lambda v: 1 <= v <= 4096, "an integer >= 1"),
    "grad_accum": (lambda v: 1 <= v <= 4096, "an integer >= 1"),
    "memory_gib": (lambda v: v is None or v > 0, "a number of GiB > 0"),
    "seq_len": (lambda v: 16 <= v <= 1 << 20, "an integer >= 16"),
    "precision": (lambda v: v in ("auto", "bf16", "fp32"), "auto, bf16 or fp32"),
    "threads": (lambda v: v >= 0, "an integer >= 0"),
    "val_split": (lambda v: 0 <= v < 1, "a fraction from 0 to below 1"),
    "format": (lambda v: v in ("auto", "openai", "sharegpt", "alpaca", "completion", "text",
                               "preference", "openai_preference"),
               "auto, openai, sharegpt, alpaca, completion, text, preference or "
               "openai_preference"),
    "method": (lambda v: v in ("sft", "dpo", "orpo"), "sft, dpo or orpo"),
    "reasoning": (lambda v: v in ("auto", "inline", "drop"), "auto, inline or drop"),
    "max_samples": (lambda v: v is None or v >= 1, "an integer >= 1"),
    "beta": (lambda v: 0 < v <= 100, "a number > 0"),
    "train_on": (lambda v: v in ("assistant", "all"), "assistant or all"),
    "overflow": (lambda v: v in ("truncate", "drop"), "truncate or drop"),
    "system_mode": (lambda v: v in ("keep", "fold"), "keep or fold"),
    "eval_every": (lambda v: v >= 0, "an integer >= 0"),
    "save_every": (lambda v: v >= 0, "an integer >= 0"),
    "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "nproc": (lambda v: 1 <= v <= 1024, "an integer >= 1"),
    "nnodes": (lambda v: 1 <= v <= 1024, "an integer >= 1"),
    "rdzv": (lambda v: v is None or re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}", v) is not None,
             "HOST:PORT"),
    "target_modules": (lambda v: isinstance(v, list) and v and all(
        isinstance(x, str) and re.fullmatch(r"[\w.\-]+", x) for x in v) and (
        ALL_LINEAR not in v or len(v) == 1), "a non-empty list of module names, or all-linear"),
    "lora_dropout": (lambda v: 0 <= v < 1, "a probability from 0 to below 1"),
    "report_to": (lambda v: v in REPORT_TO, " | ".join(REPORT_TO)),
    "replay": (lambda v: v >= 0, "an integer >= 0: general records to mix in, 0 = none"),
    "replay_kl": (lambda v: 0 <= v <= 100, "a weight from 0 to 100: the KL-to-base term on "
                  "the replay records, 0 = none"),
}


def _coerce(name: str, value: Any, where: str) -> Any:
    f = {f.name: f for f in fields(TrainConfig)}[name]
    kind = str(f.type)
    try:
        if value is None:
            return None
        if name == "data":  # one source as a string; several (--data repeated, a TOML list)
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
                raise ValueError
            items = [x for x in items if x.strip()]
            return items[0] if len(items) == 1 else list(items)
        if name == "columns" and isinstance(value, dict):  # columns = {question = "prompt"}
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                raise ValueError
            return ",".join(f"{k}={v}" for k, v in value.items())
        if "list" in kind:
            # --target-modules q_proj,v_proj (or a TOML string): a comma-separated list
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                raise ValueError
            return [x.strip() for x in items if x.strip()]
        if "int" in kind and "list" not in kind:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if "float" in kind:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if "str" in kind and "list" not in kind:
            if not isinstance(value, str):
                raise ValueError
        if kind == "bool" and not isinstance(value, bool):
            raise ValueError
    except (TypeError, ValueError):
        raise EdgeTuneError(f"{where}{name}: {value!r} is not a valid {kind.replace('Optional', '')}")
    return value


def build(toml_path: Optional[Path] = None, **flags: Any) -> TrainConfig:
    """Defaults < run.toml < flags (flags that are None are 'not given')."""
    values: dict[str, Any] = {}
    names = {f.name for f in fields(TrainConfig)}
    if toml_path is not None:
        toml_path = Path(toml_path)
        try:
            doc = tomllib.loads(toml_path.read_text())
        except FileNotFoundError:
            raise EdgeTuneError(f"{toml_path}: no such config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise EdgeTuneError(f"{toml_path}: invalid TOML ({exc})") from None
        table = doc.get("train", doc)
        for key, value in table.items():
            key_ = key.replace("-", "_")
            if key_ not in names:
                raise EdgeTuneError(f"{toml_path}: unknown key {key!r} (expected one of "
                                    f"{', '.join(sorted(names))})")
            values[key_] = _coerce(key_, value, f"{toml_path}: ")
    for key, value in flags.items():
        if value is not None:
            values[key] = _coerce(key, value, "--")
    cfg = TrainConfig(**values)
    for key, (ok, expected) in _CHECKS.items():
        if not ok(getattr(cfg, key)):
            raise EdgeTuneError(f"{key}: {getattr(cfg, key)!r} is not valid (expected {expected})")
    if cfg.columns:  # a malformed mapping: one line now, not after the model loads
        from edge_tune.data.layouts import parse_columns

        parse_columns(cfg.columns)
    if cfg.val and cfg.val_split:
        raise EdgeTuneError("give either --val FILE or --val-split, not both")
    if cfg.replay or cfg.replay_kl:
        _check_replay(cfg)
    if cfg.nnodes > 1 and not cfg.rdzv:
        raise EdgeTuneError(f"nnodes: {cfg.nnodes} machines need --rdzv HOST:PORT (the "
                            "rendezvous every node reaches, e.g. the first node's address)")
    if cfg.full:
        _refuse_lora_only(cfg, values)
        if "lr" not in values:  # LoRA's 1e-3 would wreck a model when every weight moves
            cfg.lr = FULL_LR
    if not cfg.data:
        raise EdgeTuneError("no training data: pass --data FILE (or data = ... in --config)")
    return cfg


def _check_replay(cfg: TrainConfig) -> None:
    """``--replay N``: at most the shipped general prompts, and supervised training only."""
    from edge_tune.replay import max_replay

    if cfg.replay > max_replay():
        raise EdgeTuneError(f"replay: {cfg.replay} is not valid (expected at most "
                            f"{max_replay()}: the general prompts edge-tune ships)")
    if cfg.method != "sft":
        raise UsageError(f"--replay: mixes general chat answers into supervised training; "
                         f"--method {cfg.method} trains on preference pairs (drop --replay)")
    if cfg.replay_kl and not cfg.replay:
        raise UsageError(f"--replay-kl {cfg.replay_kl:g}: weighs a term on the replay records; "
                         "give --replay N too (e.g. --replay 60)")
    if cfg.replay_kl and cfg.full:
        raise UsageError("--replay-kl: the base it compares with is the model with the LoRA "
                         "adapter off; --full trains no adapter (drop --replay-kl)")


# LoRA-only settings and what they mean, for the one-line refusal next to --full
LORA_ONLY = ("rank", "alpha", "rslora", "dora", "lora_dropout", "target_modules")


def _refuse_lora_only(cfg: TrainConfig, given: dict[str, Any]) -> None:
    """Refuse, with ``full``, preference tuning and a LoRA-only setting given (flag or TOML)
    with a value other than its default (a saved run's config, read back for ``--resume``,
    lists every setting, LoRA's at their defaults)."""
    if cfg.method != "sft":
        raise UsageError(f"--method {cfg.method}: preference tuning trains a LoRA adapter (the "
                         "reference is the base with it switched off), not with --full")
    defaults = TrainConfig()
    for name in LORA_ONLY:
        if name not in given or given[name] == getattr(defaults, name):
            continue
        flag = "--" + name.replace("_", "-")
        raise UsageError(f"{flag}: a LoRA setting, not valid with --full (full fine-tuning "
                         "trains every weight: drop it, or drop --full)")
