"""Run configuration: each setting declared once (a :class:`TrainConfig` field: name, type,
default, and in its metadata the help and flag), read from defaults, a TOML file, then
command-line flags, validated in one place."""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Union

from edge_tune.config_aliases import PRESETS, translate
from edge_tune.errors import DataError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ALL_LINEAR = "all-linear"  # target_modules: every linear layer of the blocks
REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")
FULL_LR = 2e-5  # --full's default learning rate (LoRA's: TrainConfig.lr)
LR_SCHEDULERS = ("cosine", "linear", "constant")  # names as transformers' get_scheduler
OPTIMIZERS = ("adamw", "adamw_8bit", "sgd", "adafactor")  # each backend's: training.registry
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# help shared with the commands that read a run (chat, serve, data inspect)
TEMPLATE_HELP = ("Chat template to render conversations with instead of the model's own: a "
                 "built-in name (chatml, smollm2, llama3, qwen2, qwen3, gemma, gemma2, phi3, "
                 "mistral) or a Jinja file. A run stores the one it trained with; chat, serve, "
                 "verify, bundle and export use it without being told again.")
SYSTEM_MODE_HELP = ("keep (system messages as the template renders them) | fold (into the "
                    "first user turn, for templates that reject the system role).")


def option(default: Any = MISSING, *, help: str, flags: Optional[tuple[str, ...]] = None,
           metavar: Optional[str] = None, cli_type: Any = None, label: Optional[str] = None,
           tip: Optional[str] = None, default_factory: Any = MISSING) -> Any:
    """A :class:`TrainConfig` field, described once for every front end (field metadata).

    ``help``: what the setting does, as ``train --help`` shows it. ``flags``: its spellings on
    the command line when not ``--NAME`` (``--x/--no-x`` for a switch), ``()`` for a setting
    only a run.toml sets. ``metavar``/``cli_type``: the flag's value name, and its type where
    it is not the field's (a path, a list given one flag per item). ``label``/``tip``: the TUI
    train form's label and tooltip where they are not the name and the help. The CLI's flags
    (``edge_tune.cli.common.setting``), the run.toml keys (:func:`build`) and the TUI's form
    fields are made from these."""
    meta = {"help": help, "flags": flags, "metavar": metavar, "cli_type": cli_type,
            "label": label, "tip": tip}
    return field(default=default, default_factory=default_factory,
                 metadata={k: v for k, v in meta.items() if v is not None})


@dataclass
class TrainConfig:
    """One training run's settings; each field's metadata (:func:`option`) is its ``train``
    flag, help and TUI label. Defaults < run.toml < flags: :func:`build`."""

    # --- the data --------------------------------------------------------------------------
    # one source, or a list of them mixed (--data repeated; data = [...] in TOML):
    # edge_tune.data.layouts
    data: Union[str, list] = option(
        "", flags=("--data", "-d"), metavar="SOURCE", cli_type=list[str],
        help="Training data, repeatable to mix sources: a .jsonl, .json, .csv, .tsv, "
             ".parquet, .txt or .arrow file; a folder (train, valid, test files: train trains, "
             "valid validates, test is left for `eval`; else every file trains); a datasets "
             "save_to_disk folder; a hub ID NAME[:CONFIG][@SPLIT] read from the local HF "
             "cache. SOURCE*W weights a source (0.5 = a seeded half, 2 = twice). Formats: "
             "OpenAI messages, ShareGPT, Alpaca, prompt/completion, text, preference pairs "
             "(docs/data.md).")
    # source column -> edge-tune key (hub sets, CSVs)
    columns: Optional[str] = option(
        None, metavar="SRC=KEY,...",
        help="Rename source columns to the keys edge-tune reads, e.g. "
             "question=prompt,answer=completion (every source; a missing column is an error).")
    max_samples: Optional[int] = option(
        None, metavar="N", help="Read only the first N records of each source.")
    format: str = option(
        "auto", help="auto | openai | sharegpt | alpaca | completion | text [default: auto].")
    skip_invalid: bool = option(
        False, flags=("--skip-invalid",),
        help="Skip bad records (listed) instead of stopping at the first.")
    train_on: str = option(
        "assistant", help="assistant (loss on assistant turns only) | all [default: assistant].")
    overflow: str = option(
        "truncate", help="Examples longer than --seq-len: truncate | drop [default: truncate]; "
                         "counted and reported either way.")
    # cpu: block-diagonal attention inside each packed row
    pack: bool = option(
        True, help="Pack each batch into as few rows of --seq-len tokens as fit, attention kept "
                   "inside each example; --no-pack pads length-grouped batches instead "
                   "[default: pack].")
    # --- the model and the run ---------------------------------------------------------------
    model: str = option(
        "default", flags=("--model", "-m"),
        help="'default' (embedded SmolLM2-135M), a .gguf file, an HF model directory, or a hub "
             "ID.")
    backend: str = option("auto", help="auto | cpu | mlx | unsloth.")
    out: Optional[str] = option(
        None, flags=("--out", "-o"), cli_type=Path,
        help="Run directory (default runs/run-DATE-TIME).")
    # --- the optimization --------------------------------------------------------------------
    # edge_tune.config_aliases.PRESETS: under the run.toml's settings and the flags
    preset: str = option(
        "edge-tune", metavar="edge-tune|unsloth|mlx-lm|trl",
        help="Start from another tool's defaults (learning rate, rank, alpha, batch, seq-len; "
             "the table is in docs/coming-from.md); options and config keys given override "
             "them [default: edge-tune].")
    epochs: float = option(2.0, help="Passes over the data [default: 2].")
    max_steps: Optional[int] = option(
        None, help="Stop after N optimizer steps (overrides --epochs).")
    lr: float = option(1e-3, help="Peak learning rate [default: 1e-3; 2e-5 with --full].")
    warmup_steps: int = option(
        5, flags=("--warmup",), metavar="STEPS",
        help="Steps of linear learning-rate warm-up before the decay (at most a tenth of the "
             "run) [default: 5].")
    # TRL's warmup_ratio; the steps are worked out once the run's length is known
    warmup_ratio: float = option(
        0.0, metavar="FRACTION",
        help="Or warm up over this share of the run's steps, e.g. 0.03 (replaces --warmup; "
             "not capped) [default: 0 = use --warmup].")
    # edge_tune.training.loop.lr_at: one schedule for every backend
    lr_scheduler: str = option(
        "cosine", metavar="cosine|linear|constant",
        help="After warm-up: cosine or linear decay to a tenth of the peak, or constant (the "
             "peak to the end) [default: cosine].")
    weight_decay: float = option(
        0.0, help="Decoupled weight decay of the optimizer (AdamW's, or SGD's and Adafactor's "
                  "own) [default: 0].")
    # each backend's are in training.registry (`doctor` lists them)
    optimizer: str = option(
        "adamw", metavar="adamw|adamw_8bit|sgd|adafactor",
        help="adamw | sgd (plain, as transformers' sgd) | adafactor; adamw_8bit on unsloth "
             "(bitsandbytes); `edge-tune doctor` lists each backend's [default: adamw].")
    rank: int = option(16, help="LoRA rank r [default: 16].")
    alpha: float = option(32.0, help="LoRA alpha; scale = alpha/r [default: 32].")
    batch_size: int = option(8, label="batch", help="Examples per step [default: 8].")
    grad_accum: int = option(
        1, help="Batches per optimizer step (effective batch = batch-size x this) [default: 1; "
                "raised by the planner to fit].")
    grad_checkpoint: bool = option(
        False, help="Recompute each block in backward: far less memory, ~1/3 slower [default: "
                    "off; on if needed to fit].")
    memory_gib: Optional[float] = option(
        None, help="Memory budget for the planner in GiB [default: what is free now].")
    exact: bool = option(
        False, flags=("--exact",),
        help="Keep the batch size, grad-accum and seq-len exactly as given: refuse (exit 2) "
             "where the planner would change them to fit the memory [default: off].")
    precision: str = option(
        "auto", help="auto (bf16 where the CPU has it) | bf16 | fp32 [default: auto].")
    threads: int = option(
        0, flags=(), help="CPU threads of each training process; 0 = the physical cores, shared "
                          "among the processes [default: 0].")
    seq_len: int = option(
        512, label="seq-len",
        help="Max tokens per example; longer ones are truncated [default: 512].")
    seed: int = option(0, help="Random seed [default: 0].")
    # --- validation, checks, checkpoints -----------------------------------------------------
    val: Optional[str] = option(
        None, cli_type=Path,
        help="Validation data (same format); validation loss is reported during training.")
    val_split: float = option(
        0.0, help="Or hold out this share of --data for validation, e.g. 0.1.")
    eval_every: int = option(
        0, metavar="N", help="Steps between validation passes (and the validation loss); 0 = "
                             "about 5 over the run [default: 0].")
    verify: bool = option(
        True, help="After training, check llama.cpp against torch+PEFT on held-back prompts; "
                   "out of tolerance exits 1 [default: on].")
    # 0: only on cancel
    save_every: int = option(
        50, help="Save a resumable checkpoint (RUN/checkpoint) every N steps; one is always "
                 "saved on cancel (default 50).")
    # training.checkpoint.keep_adapter: RUN/checkpoint-STEP/adapter, kept after the run
    save_total_limit: int = option(
        0, metavar="N",
        help="Also keep the adapter of every --save-every step and validation step in "
             "RUN/checkpoint-STEP/ after the run: the newest N, plus the best by validation "
             "loss (marked in the manifest and train's last lines); export, chat, serve and "
             "eval take RUN/checkpoint-STEP [default: 0 = none].")
    # --- processes and machines (torchrun) ---------------------------------------------------
    nproc: int = option(
        1, help="Training processes on this machine, launched by torchrun (torch.distributed: "
                "gloo on CPU, NCCL with one GPU each for unsloth), each reading its shard; the "
                "global batch is batch-size x grad-accum x processes [default: 1].")
    nnodes: int = option(
        1, help="Machines taking part (run the same command on each) [default: 1].")
    # torchrun's --rdzv-endpoint
    rdzv: Optional[str] = option(
        None, metavar="HOST:PORT", help="With --nnodes: the rendezvous address all nodes reach.")
    # --- how chats render (stored in the run: chat, serve and export use them again) ----------
    # a built-in name (edge_tune.templates.builtin) or a Jinja file
    chat_template: Optional[str] = option(
        None, metavar="NAME|FILE",
        help=TEMPLATE_HELP + " Needed for chat data on a model without a template.")
    system_mode: str = option(
        "keep", metavar="keep|fold", help=SYSTEM_MODE_HELP + " [default: keep]")
    reasoning: str = option(
        "auto", metavar="auto|inline|drop",
        help="What to train of an assistant message's reasoning (reasoning_content or "
             "thinking): auto (the chat template renders it, as qwen3 does; a template that "
             "would drop it is refused) | inline (written into the answer between the model's "
             "think markers, <think> and </think>) | drop (answers only) [default: auto].")
    # --- the LoRA adapter (refused with full) ------------------------------------------------
    rslora: bool = option(
        False, help="Rank-stabilized LoRA: scale the update by alpha/sqrt(r) [default: off].")
    dora: bool = option(
        False, help="Weight-decomposed LoRA (magnitude + direction); exports through --merge "
                    "[default: off].")
    lora_dropout: float = option(
        0.0, metavar="P", help="Dropout on the LoRA branch's input while training, 0 <= P < 1 "
                               "[default: 0].")
    # checked against the model before its weights load
    target_modules: list[str] = option(
        default_factory=lambda: list(DEFAULT_TARGETS), metavar="NAMES", cli_type=str,
        help="Modules to adapt inside each block, comma-separated (q_proj,v_proj), or "
             "all-linear [default: the seven projections].")
    # --- what is trained ---------------------------------------------------------------------
    # DPO: Rafailov et al. 2023; ORPO: Hong et al. 2024
    method: str = option(
        "sft", metavar="sft|dpo|orpo|kto|grpo",
        help="sft (supervised), or preference tuning on prompt/chosen/rejected pairs: dpo or "
             "orpo; or kto on unpaired answers marked good or bad ('label' / 'kto_tag'); or "
             "grpo on prompts scored by --reward (docs/rl.md) [default: sft].")
    # KTO data under sft/dpo/orpo; without it such data is refused
    desirable_only: bool = option(
        False, flags=("--desirable-only",),
        help="KTO data (records with 'label' or 'kto_tag'): train only the desirable answers "
             "(label true) with --method sft and say how many were left out; without it such "
             "data is refused.")
    beta: float = option(
        0.1, help="DPO's and KTO's beta (how far from the base the adapter may move) or "
                  "ORPO's lambda (weight of the odds-ratio term) [default: 0.1].")
    # KTO: Ethayarajh et al. 2024, TRL's KTOConfig names
    desirable_weight: float = option(
        1.0, metavar="W",
        help="KTO: weight of the desirable answers' loss (TRL's desirable_weight); raise it "
             "when they are fewer than the undesirable ones [default: 1].")
    undesirable_weight: float = option(
        1.0, metavar="W",
        help="KTO: weight of the undesirable answers' loss (TRL's undesirable_weight) "
             "[default: 1].")
    # LoRA-only settings (LORA_ONLY) are refused with it; cpu and mlx backends
    full: bool = option(
        False, help="Full fine-tuning: train every weight (AdamW) instead of a LoRA adapter; "
                    "writes HF safetensors weights and a GGUF model; refused when weights, "
                    "gradients and optimizer state do not fit the memory [default: off].")
    # the base's own answers to general prompts shipped with edge-tune (edge_tune/replay.py)
    replay: int = option(
        0, metavar="N",
        tip="general replay (train --replay N): mix N of the base model's own answers to "
            "general prompts into training, so a narrow task does not take over every prompt; "
            "0 = none, at most {max}; supervised (sft) training only",
        help="Keep the base's general behaviour: mix N general records (the base model's own "
             "answers to general prompts edge-tune ships, generated once in llama.cpp and "
             "cached) into training, so a narrow task does not take over every prompt. "
             "Measured on a narrow email-to-JSON task: 40 took general prompts answered like "
             "the task from 19 to 1 of 20 at no loss of task score; `edge-tune eval RUN` "
             "measures it (docs/eval.md, Forgetting) [default: 0, max 60].")
    # KL(base || tuned) over the full vocabulary on the replay records' answer tokens, added
    # to their cross-entropy: the whole next-token distribution kept, not only the base's
    # greedy token; needs replay
    replay_kl: float = option(
        0.0, metavar="WEIGHT",
        help="With --replay: also keep the base's whole next-token distribution on the replay "
             "answers (a KL-to-base term of this weight, the base being the model with the "
             "adapter off; cpu backend) [default: 0].")
    # tensorboard: RUN/tb event files; wandb offline unless WANDB_MODE says otherwise
    report_to: str = option(
        "tensorboard", help="tensorboard | wandb | mlflow | none: where the run's metrics also "
                            "go (tensorboard: RUN/tb; wandb offline) [default: tensorboard]; "
                            "RUN/loss.png is always written.")
    # --- GRPO (--method grpo; TRL's GRPOConfig names) ----------------------------------------
    # edge_tune.training.rewards: built-ins and module:function
    reward: list[str] = option(
        default_factory=list, metavar="SPEC", cli_type=list[str],
        help="GRPO: a reward function, repeatable: regex:PATTERN | json | json-schema:FILE | "
             "exact:COLUMN | numeric:COLUMN | tool-call | length:N | MODULE:FUNCTION | "
             "FILE.py:FUNCTION (TRL's fn(prompts, completions, **columns) -> list[float]); "
             "docs/rl.md.")
    reward_weights: list[str] = option(
        default_factory=list, metavar="W,...", cli_type=str,
        help="GRPO: one weight per --reward, comma-separated, in order [default: 1 each].")
    num_generations: int = option(
        8, metavar="G", help="GRPO: completions sampled per prompt (by llama.cpp); --batch-size "
                             "counts completions and must be a multiple [default: 8].")
    max_completion_length: int = option(
        256, metavar="N", help="GRPO: new tokens per completion at most [default: 256].")
    temperature: float = option(
        1.0, help="GRPO: sampling temperature of the rollouts [default: 1].")
    epsilon: float = option(
        0.2, help="GRPO: clip range of the probability ratio [default: 0.2].")
    loss_type: str = option(
        "dapo", metavar="grpo|dr_grpo|dapo",
        help="GRPO: how the per-token loss is averaged, as TRL's loss_type: grpo (per "
             "sequence, then batch) | dr_grpo (sum / (batch x max completion length)) | dapo "
             "(sum / all completion tokens) [default: dapo].")
    # TRL's vllm_importance_sampling_clip_max (token_truncate)
    is_cap: float = option(
        3.0, help="GRPO: cap of the per-token importance-sampling ratio that corrects for "
                  "llama.cpp's rollouts differing from the trainer [default: 3].")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cli_flags(f: Field) -> tuple[str, ...]:
    """A setting's spellings on the command line, as typer takes them (``("--data", "-d")``,
    ``("--pack/--no-pack",)``); ``()`` for one only a run.toml sets."""
    given = f.metadata.get("flags")
    if given is not None:
        return given
    name = f.name.replace("_", "-")
    return (f"--{name}/--no-{name}",) if f.type in ("bool", bool) else (f"--{name}",)


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
    "preset": (lambda v: v in PRESETS, " | ".join(PRESETS)),
    "threads": (lambda v: v >= 0, "an integer >= 0"),
    "val_split": (lambda v: 0 <= v < 1, "a fraction from 0 to below 1"),
    "format": (lambda v: v in ("auto", "openai", "sharegpt", "alpaca", "completion", "text",
                               "preference", "openai_preference"),
               "auto, openai, sharegpt, alpaca, completion, text, preference or "
               "openai_preference"),
    "method": (lambda v: v in ("sft", "dpo", "orpo", "kto", "grpo"),
               "sft, dpo, orpo, kto or grpo"),
    "reasoning": (lambda v: v in ("auto", "inline", "drop"), "auto, inline or drop"),
    "max_samples": (lambda v: v is None or v >= 1, "an integer >= 1"),
    "beta": (lambda v: 0 <= v <= 100, "a number >= 0 (0: GRPO only)"),
    "desirable_weight": (lambda v: 0 < v <= 100, "a weight > 0"),
    "undesirable_weight": (lambda v: 0 < v <= 100, "a weight > 0"),
    "train_on": (lambda v: v in ("assistant", "all"), "assistant or all"),
    "overflow": (lambda v: v in ("truncate", "drop"), "truncate or drop"),
    "system_mode": (lambda v: v in ("keep", "fold"), "keep or fold"),
    "eval_every": (lambda v: v >= 0, "an integer >= 0"),
    "save_every": (lambda v: v >= 0, "an integer >= 0"),
    "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "a fraction from 0 to below 1"),
    "lr_scheduler": (lambda v: v in LR_SCHEDULERS, " | ".join(LR_SCHEDULERS)),
    "weight_decay": (lambda v: 0 <= v < 1, "a number from 0 to below 1"),
    "optimizer": (lambda v: v in OPTIMIZERS, " | ".join(OPTIMIZERS)),
    "save_total_limit": (lambda v: v >= 0, "an integer >= 0: checkpoints kept, 0 = none"),
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
    "num_generations": (lambda v: 2 <= v <= 256, "an integer from 2 to 256"),
    "max_completion_length": (lambda v: 1 <= v <= 1 << 16, "an integer >= 1"),
    "temperature": (lambda v: 0 < v <= 10, "a number > 0"),
    "epsilon": (lambda v: 0 < v < 1, "a number between 0 and 1"),
    "loss_type": (lambda v: v in ("grpo", "dr_grpo", "dapo"), "grpo, dr_grpo or dapo"),
    "is_cap": (lambda v: v >= 1, "a number >= 1"),
    "reward_weights": (lambda v: all(_is_number(x) for x in v), "numbers, comma-separated"),
    "replay_kl": (lambda v: 0 <= v <= 100, "a weight from 0 to 100: the KL-to-base term on "
                  "the replay records, 0 = none"),
}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _coerce(name: str, value: Any, where: str) -> Any:
    f = {f.name: f for f in fields(TrainConfig)}[name]
    kind = str(f.type)
    try:
        if value is None:
            return None
        if name == "data":
            return _data_sources(value)
        if name == "columns" and isinstance(value, dict):  # columns = {question = "prompt"}
            return _columns_text(value)
        if "list" in kind:
            return _name_list(value)
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
        what = f"{value!r} is not a valid {kind.replace('Optional', '')}"
        if where == "--":  # a flag (or a TUI field): the front end spells the setting
            raise UsageError(what, setting=name) from None
        raise DataError(f"{where}{name}: {what}") from None
    return value


def _data_sources(value: Any) -> str | list[str]:
    """``data``: one source as a string; several (--data repeated, a TOML list) as a list,
    blank entries left out. ValueError for anything but strings."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
        raise ValueError
    items = [x for x in items if x.strip()]
    return items[0] if len(items) == 1 else list(items)


def _columns_text(value: dict) -> str:
    """A TOML ``columns`` table as the flag's ``KEY=COLUMN,...`` text. ValueError for
    non-string keys or values."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError
    return ",".join(f"{k}={v}" for k, v in value.items())


def _name_list(value: Any) -> list[str]:
    """A list setting: ``--target-modules q_proj,v_proj`` (or a TOML string) is a
    comma-separated list; a TOML list is taken as it is. Blank names are left out; ValueError
    for anything but strings."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise ValueError
    return [x.strip() for x in items if x.strip()]


def build(toml_path: Optional[Path] = None, *, strict: bool = False,
          say: Optional[Callable[[str], None]] = None, **flags: Any) -> TrainConfig:
    """Defaults < ``--preset`` < the config file (TOML or YAML, edge-tune's keys or another
    tool's: :func:`_read_config`) < flags (flags that are None are 'not given'). ``say``
    gets a line per foreign key read and a warning per key ignored; ``strict``: UsageError
    for the first key ignored instead."""
    say = say or (lambda line: None)
    origins: dict[str, str] = {}  # setting -> the config file's key that set it
    values: dict[str, Any] = {} if toml_path is None else _read_config(
        Path(toml_path), strict, say, origins)
    for key, value in flags.items():
        if value is not None:
            values[key] = _coerce(key, value, "--")
            origins.pop(key, None)
    preset = values.get("preset", "edge-tune")
    if preset not in PRESETS:
        raise UsageError(f"not a preset (expected {' | '.join(PRESETS)})", setting="preset",
                         value=preset)
    known = {f.name for f in fields(TrainConfig)}  # a preset may name a setting not here yet
    defaults = {k: v for k, v in PRESETS[preset].items() if k in known}
    if "epochs" in values:  # the run's length given in epochs: not the preset's step count
        defaults.pop("max_steps", None)
    cfg = TrainConfig(**{**defaults, **values})
    _check_values(cfg)
    if cfg.method == "kto" and cfg.batch_size < 2:  # TRL's KTOTrainer refuses it too
        raise UsageError(f"--method kto: --batch-size {cfg.batch_size}: KTO's KL estimate pairs "
                         "each prompt with another answer of its batch; give --batch-size 2 "
                         "or more")
    if cfg.method == "grpo" or cfg.reward:
        _check_grpo(cfg, values)
    else:
        _check_beta(cfg, values, origins, toml_path, strict, say)
    if cfg.columns:  # a malformed mapping: one line now, not after the model loads
        from edge_tune.data.layouts import parse_columns

        parse_columns(cfg.columns)
    if cfg.val and cfg.val_split:
        raise UsageError("give either --val FILE or --val-split, not both")
    if cfg.replay or cfg.replay_kl:
        _check_replay(cfg)
    if cfg.nnodes > 1 and not cfg.rdzv:
        raise UsageError(f"nnodes: {cfg.nnodes} machines need --rdzv HOST:PORT (the "
                         "rendezvous every node reaches, e.g. the first node's address)")
    if cfg.full:
        _refuse_lora_only(cfg, values)
        if "lr" not in values:  # LoRA's 1e-3 would wreck a model when every weight moves
            cfg.lr = FULL_LR
    if not cfg.data:
        raise UsageError("no training data: pass --data FILE (or data = ... in --config)")
    return cfg


def _read_config(path: Path, strict: bool, say: Callable[[str], None],
                 origins: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The settings of a config file (its ``[train]`` table, or the whole document): TOML,
    or YAML (``.yaml``/``.yml``, or what is not TOML), with edge-tune's keys or those of
    Axolotl, LLaMA-Factory, Unsloth, mlx-lm or TRL (:func:`edge_tune.config_aliases.translate`),
    coerced to the fields' types; ``origins`` gets, per setting, the file's key that set it.
    EdgeTuneError for a missing file, a document that does not parse, an unknown key in an
    edge-tune config, or (``strict``) any key ignored."""
    names = {f.name for f in fields(TrainConfig)}
    doc = _parse_config(path)
    table = doc["train"] if isinstance(doc.get("train"), dict) else doc
    read = translate(table, names, str(path),
                     lambda key, value: key not in _CHECKS or _CHECKS[key][0](value))
    if strict and read.ignored:
        key, why = read.ignored[0]
        raise UsageError(f"{path}: {key}: ignored ({why}); --strict refuses a key edge-tune "
                         "cannot honour: drop it, or drop --strict")
    if origins is not None:
        origins.update({s: read.setters.get(s, s) for s in read.values})
    for line in read.lines:
        say(f"{path}: {line}")
    for key, why in read.ignored:
        say(f"warning: {path}: {key} ignored: {why}")
    return {key: _coerce(key, value, f"{path}: ") for key, value in read.values.items()}


def _parse_config(path: Path) -> dict:
    """A config file as a mapping: TOML, or YAML by its suffix (or when it is not TOML).
    EdgeTuneError for a missing file or one that parses to no mapping."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the config file ({exc})") from None
    doc: Any = None
    if path.suffix.lower() not in (".yaml", ".yml"):
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            if path.suffix.lower() == ".toml":
                raise DataError(f"{path}: invalid TOML ({exc})") from None
            toml_error = exc
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        if path.suffix.lower() not in (".yaml", ".yml"):  # neither: say what TOML saw
            raise DataError(f"{path}: invalid TOML ({toml_error})") from None
        raise DataError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") \
            from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a mapping of settings (key: value), got "
                        f"{type(doc).__name__}")
    return doc


def _check_values(cfg: TrainConfig) -> None:
    """Each setting of ``_CHECKS`` within its range; else EdgeTuneError saying what is
    expected."""
    for key, (ok, expected) in _CHECKS.items():
        if not ok(getattr(cfg, key)):
            raise UsageError(f"{key}: {getattr(cfg, key)!r} is not valid (expected {expected})")


def _check_replay(cfg: TrainConfig) -> None:
    """``--replay N``: at most the shipped general prompts, and supervised training only."""
    from edge_tune.replay import max_replay

    if cfg.replay > max_replay():
        raise UsageError(f"replay: {cfg.replay} is not valid (expected at most "
                         f"{max_replay()}: the general prompts edge-tune ships)")
    if cfg.method != "sft":
        raise UsageError("mixes general chat answers into supervised training; "
                         f"--method {cfg.method} trains on preference pairs (drop --replay)",
                         setting="replay")
    if cfg.replay_kl and not cfg.replay:
        raise UsageError("weighs a term on the replay records; "
                         "give --replay N too (e.g. --replay 60)",
                         setting="replay_kl", value=f"{cfg.replay_kl:g}")
    if cfg.replay_kl and cfg.full:
        raise UsageError("the base it compares with is the model with the LoRA "
                         "adapter off; --full trains no adapter (drop --replay-kl)",
                         setting="replay_kl")


def _check_beta(cfg: TrainConfig, given: dict[str, Any], origins: dict[str, str],
                path: Optional[Path], strict: bool, say: Callable[[str], None]) -> None:
    """``beta`` outside GRPO: dpo, kto and orpo need it > 0; sft does not use it (a warning,
    or with ``strict`` a refusal, when one other than the default was given). A value from
    the config file is named by the file and its key, one from a flag by the flag."""
    where = f"{path}: {origins['beta']}" if "beta" in origins else "--beta"
    if cfg.method == "sft":
        if "beta" in given and cfg.beta != TrainConfig().beta:
            if strict and "beta" in origins:
                raise UsageError(f"{where}: ignored ({cfg.beta:g}: sft does not use beta); "
                                 "--strict refuses a key edge-tune cannot honour: drop it, or "
                                 "drop --strict")
            say(f"warning: {where} {cfg.beta:g}: no effect with method sft (beta is DPO's, "
                "KTO's, ORPO's and GRPO's; set the method: --method, or stage/rl in the file)")
        return
    if cfg.beta == 0:
        method = (f"method {cfg.method} ({origins['method']})" if "method" in origins
                  else f"--method {cfg.method}")
        raise UsageError(f"{where} 0: {method} needs a beta > 0 (0 turns the KL term off, "
                         "which only GRPO allows)")


GRPO_BETA = 0.04  # GRPO's default KL weight: TRL's before 0.19 (DeepSeekMath's)


def _check_grpo(cfg: TrainConfig, given: dict[str, Any]) -> None:
    """``--method grpo``: at least one reward, completions per step a multiple of ``num_generations``; its own default
    beta. ``--reward`` without ``--method grpo`` is refused."""
    if cfg.method != "grpo":
        raise UsageError(f"--reward: reward functions are GRPO's; --method {cfg.method} "
                         "trains on answers in the data (add --method grpo, or drop --reward)")
    if not cfg.reward:  # each spec is parsed by the backend check (training.registry)
        raise UsageError("--method grpo needs at least one --reward (e.g. --reward "
                         "'regex:^Answer: \\d+$'; docs/rl.md lists them)")
    if cfg.batch_size % cfg.num_generations:
        raise UsageError(f"--batch-size {cfg.batch_size}: GRPO's batch counts completions, "
                         f"--num-generations {cfg.num_generations} per prompt (expected a "
                         "multiple of it)")
    if cfg.full:
        raise UsageError("--method grpo: trains a LoRA adapter (llama.cpp samples with it and "
                         "the reference is the base with it off), not with --full")
    if "beta" not in given:
        cfg.beta = GRPO_BETA


# LoRA-only settings and what they mean, for the one-line refusal next to --full
# (save_total_limit: its checkpoint folders hold adapters)
LORA_ONLY = ("rank", "alpha", "rslora", "dora", "lora_dropout", "target_modules",
             "save_total_limit")


def _refuse_lora_only(cfg: TrainConfig, given: dict[str, Any]) -> None:
    """Refuse, with ``full``, preference tuning and a LoRA-only setting given (flag or TOML)
    with a value other than its default (a saved run's config, read back for ``--resume``,
    lists every setting, LoRA's at their defaults)."""
    if cfg.method != "sft":
        raise UsageError("preference tuning trains a LoRA adapter (the "
                         "reference is the base with it switched off), not with --full",
                         setting="method", value=cfg.method)
    defaults = TrainConfig()
    for name in LORA_ONLY:
        if name not in given or given[name] == getattr(defaults, name):
            continue
        raise UsageError("a LoRA setting, not valid with --full (full fine-tuning trains every "
                         "weight: drop it, or drop --full)", setting=name)
