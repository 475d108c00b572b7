"""Other tools' config keys, flags and defaults in edge-tune's terms: one table.

A config file for ``train --config`` may be written for Axolotl, LLaMA-Factory, Unsloth's CLI
(``unsloth-cli.py``), mlx-lm (``mlx_lm.lora -c``) or TRL's scripts (``SFTConfig``,
``ScriptArguments``, ``ModelConfig``). :data:`ALIASES` says, per foreign key, which
:class:`~edge_tune.config.TrainConfig` field it sets and how its value converts (mlx-lm's
``scale`` is the multiplier itself: alpha = scale x rank); keys edge-tune has no use for are
either *moot* (edge-tune does that anyway: a note) or *ignored* (it cannot honour them: a
warning, and ``--strict`` refuses). :func:`translate` applies it to a parsed document;
:func:`flag_aliases` gives the command-line spellings (``--learning-rate`` for ``--lr``);
:data:`PRESETS` are the tools' own defaults (``--preset``), sourced in docs/coming-from.md.

No edge-tune imports but the error kinds, so the TrainConfig's module can use it; the one file
it reads is LLaMA-Factory's ``dataset_info.json``, where a config names its datasets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from edge_tune.errors import DataError

AXOLOTL, LLAMA_FACTORY, UNSLOTH, MLX_LM, TRL = ("Axolotl", "LLaMA-Factory", "Unsloth",
                                                "mlx-lm", "TRL")
HF = "Axolotl, LLaMA-Factory, Unsloth, TRL"  # transformers' TrainingArguments names
ALL_LINEAR = "all-linear"  # = edge_tune.config.ALL_LINEAR


@dataclass(frozen=True)
class Alias:
    """One foreign key. ``setting``: the TrainConfig field it sets (None: nothing to set);
    ``convert``: its value to edge-tune's (ValueError: not a value it can take), None = as
    is; ``flag``: also a command-line spelling of that setting's option (value as is);
    ``why``: for a key with no setting, what edge-tune does instead; ``ok``: for such a key,
    the values that change nothing (others are ignored with a warning), None = every value;
    ``soft``: a value ``convert`` refuses is ignored with a warning, not an error."""

    setting: Optional[str]
    tools: str
    convert: Optional[Callable[[Any], Any]] = None
    flag: bool = False
    why: str = ""
    ok: Optional[Callable[[Any], bool]] = None
    soft: bool = False  # a value it cannot take is ignored (a warning), not an error


def _to(setting: str, tools: str, convert: Optional[Callable[[Any], Any]] = None,
        flag: bool = False, soft: bool = False) -> Alias:
    return Alias(setting, tools, convert, flag, soft=soft)


def _moot(tools: str, why: str, ok: Optional[Callable[[Any], bool]] = None) -> Alias:
    """A key edge-tune has no setting for: every value (or those ``ok`` accepts) is what it
    does anyway; any other value is ignored with a warning."""
    return Alias(None, tools, why=why, ok=ok)


def _never(tools: str, why: str) -> Alias:
    """A key edge-tune cannot honour whatever its value (a warning)."""
    return Alias(None, tools, why=why, ok=lambda v: False)


def _off(v: Any) -> bool:
    return v in (None, False, "", 0, "none", "None", [])


def _truthy(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0"):
        return v.lower() in ("true", "yes", "1")
    if isinstance(v, int):
        return bool(v)
    raise ValueError


def _targets(v: Any) -> list[str]:
    """``all`` / ``all-linear`` / a list or comma-separated text of module names, paths
    (``self_attn.q_proj``, mlx-lm's keys) cut to their last part."""
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise ValueError
    names = [x.strip().rsplit(".", 1)[-1] for x in items if x.strip()]
    return [ALL_LINEAR] if any(n in ("all", ALL_LINEAR) for n in names) else names


def _not(v: Any) -> str:  # train_on_inputs / train_on_prompt: true = loss on every token
    return "all" if _truthy(v) else "assistant"


def _masked(v: Any) -> str:  # mask_prompt / assistant_only_loss: true = answers only
    return "assistant" if _truthy(v) else "all"


def _bf16(v: Any) -> str:
    if v == "auto":
        return "auto"
    return "bf16" if _truthy(v) else "fp32"


def _checkpointing(v: Any) -> bool:  # Unsloth's "unsloth" is its own checkpointing
    return True if v == "unsloth" else _truthy(v)


def _stage(v: Any) -> str:
    """LLaMA-Factory's ``stage`` / Axolotl's ``rl``: pt (text, every token) trains as sft."""
    method = {"sft": "sft", "pt": "sft", "dpo": "dpo", "orpo": "orpo", "kto": "kto",
              "grpo": "grpo"}.get(str(v).lower())
    if method is None:
        raise ValueError
    return method


def _finetuning(v: Any) -> bool:  # full instead of LoRA
    kind = str(v).lower()
    if kind in ("lora", "qlora", "dora"):
        return False
    if kind == "full":
        return True
    raise ValueError


def _report(v: Any) -> str:
    items = v if isinstance(v, list) else [v]
    known = [x for x in items if x in ("tensorboard", "wandb", "mlflow", "none")]
    if not known:
        raise ValueError
    return known[0]


# other tools' chat-template names -> edge-tune's built-in ones (edge_tune.templates.builtin)
TEMPLATES = {"chatml": "chatml", "llama3": "llama3", "llama-3": "llama3", "qwen": "qwen2",
             "qwen2": "qwen2", "qwen_25": "qwen2", "qwen2.5": "qwen2", "qwen3": "qwen3",
             "gemma": "gemma", "gemma2": "gemma2", "phi_3": "phi3", "phi3": "phi3",
             "phi": "phi3", "mistral": "mistral", "mistral_v1": "mistral"}
OWN_TEMPLATE = ("tokenizer_default", "default", "empty", "")


def _template(v: Any) -> str:
    if not isinstance(v, str) or v.lower() not in TEMPLATES:
        raise ValueError
    return TEMPLATES[v.lower()]


def _targets_free(v: Any) -> Any:
    """``dataset`` as edge-tune's ``data``: one source, or a comma-separated list of them
    (LLaMA-Factory's form)."""
    if isinstance(v, str) and "," in v:
        return [x.strip() for x in v.split(",") if x.strip()]
    return v


# other tools' spellings of a value of a setting that edge-tune has under the same name
SPELLINGS: dict[str, dict[str, str]] = {
    "optimizer": {"adam": "adamw", "adamw_torch": "adamw", "adamw_torch_fused": "adamw",
                  "adamw_hf": "adamw", "adamw_bnb_8bit": "adamw_8bit",
                  "paged_adamw_8bit": "adamw_8bit"},
    "lr_scheduler": {"constant_with_warmup": "constant", "cosine_decay": "cosine",
                     "linear_schedule": "linear"},
}


def _mlx_schedule(v: Any) -> str:
    """mlx-lm's ``lr_schedule: {name, arguments, warmup}``: its decay's name."""
    name = v.get("name") if isinstance(v, dict) else v
    if not isinstance(name, str):
        raise ValueError
    return SPELLINGS["lr_scheduler"].get(name, name)


_ADAMW = ("adamw", "adam", "adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_8bit",
          "paged_adamw_8bit", "adamw_bnb_8bit", "paged_adamw_32bit")

# foreign key -> what it is here. Keys spelled as a TrainConfig field (batch_size, seed, model,
# data, max_steps, warmup_steps, lora_dropout, ...) are edge-tune's own and not listed.
ALIASES: dict[str, Alias] = {
    # --- the model, the data, where the run goes -------------------------------------------
    "base_model": _to("model", AXOLOTL),
    "model_name_or_path": _to("model", f"{LLAMA_FACTORY}, {TRL}"),
    "model_name": _to("model", UNSLOTH),
    "dataset": _to("data", f"{LLAMA_FACTORY}, {UNSLOTH}", _targets_free),
    "output_dir": _to("out", HF, flag=True),
    "adapter_path": _to("out", MLX_LM),
    "val_set_size": _to("val_split", AXOLOTL),
    "val_size": _to("val_split", LLAMA_FACTORY),
    # --- the adapter ------------------------------------------------------------------------
    "lora_r": _to("rank", f"{AXOLOTL}, {TRL}", flag=True),
    "lora_rank": _to("rank", LLAMA_FACTORY),
    "r": _to("rank", UNSLOTH),
    "lora_alpha": _to("alpha", HF, flag=True),
    "lora_target_modules": _to("target_modules", f"{AXOLOTL}, {TRL}", _targets),
    "lora_target": _to("target_modules", LLAMA_FACTORY, _targets),
    "lora_target_linear": _to("target_modules", AXOLOTL,
                              lambda v: [ALL_LINEAR] if _truthy(v) else None),
    "use_rslora": _to("rslora", f"{LLAMA_FACTORY}, {UNSLOTH}, {TRL}", _truthy),
    "peft_use_rslora": _to("rslora", AXOLOTL, _truthy),
    "use_dora": _to("dora", f"{LLAMA_FACTORY}, {TRL}", _truthy),
    "peft_use_dora": _to("dora", AXOLOTL, _truthy),
    "adapter": _to("full", AXOLOTL, _finetuning),
    "finetuning_type": _to("full", LLAMA_FACTORY, _finetuning),
    "fine_tune_type": _to("full", MLX_LM, _finetuning),
    "use_peft": _to("full", TRL, lambda v: not _truthy(v)),
    # --- the optimization -------------------------------------------------------------------
    "learning_rate": _to("lr", f"{HF}, {MLX_LM}", flag=True),
    "num_epochs": _to("epochs", AXOLOTL, flag=True),
    "num_train_epochs": _to("epochs", f"{LLAMA_FACTORY}, {TRL}", flag=True),
    "iters": _to("max_steps", MLX_LM, flag=True),
    "micro_batch_size": _to("batch_size", AXOLOTL),
    "per_device_train_batch_size": _to("batch_size", HF, flag=True),
    "gradient_accumulation_steps": _to("grad_accum", HF, flag=True),
    "grad_accumulation_steps": _to("grad_accum", MLX_LM),
    "sequence_len": _to("seq_len", AXOLOTL),
    "cutoff_len": _to("seq_len", LLAMA_FACTORY, flag=True),
    "max_seq_length": _to("seq_len", f"{UNSLOTH}, {MLX_LM}, {TRL}", flag=True),
    "max_length": _to("seq_len", TRL),
    "gradient_checkpointing": _to("grad_checkpoint", HF, _checkpointing),
    "use_gradient_checkpointing": _to("grad_checkpoint", UNSLOTH, _checkpointing),
    "bf16": _to("precision", f"{AXOLOTL}, {TRL}", _bf16),
    "sample_packing": _to("pack", AXOLOTL, _truthy),
    "packing": _to("pack", f"{LLAMA_FACTORY}, {TRL}", _truthy),
    "eval_steps": _to("eval_every", HF),
    "steps_per_eval": _to("eval_every", MLX_LM),
    "save_steps": _to("save_every", HF),
    "report_to": _to("report_to", f"{HF}, {MLX_LM}", _report),
    # --- what is trained --------------------------------------------------------------------
    "train_on_inputs": _to("train_on", AXOLOTL, _not),
    "train_on_prompt": _to("train_on", LLAMA_FACTORY, _not),
    "mask_prompt": _to("train_on", MLX_LM, _masked),
    "assistant_only_loss": _to("train_on", TRL, _masked),
    "stage": _to("method", LLAMA_FACTORY, _stage),
    "rl": _to("method", AXOLOTL, _stage),
    "pref_beta": _to("beta", LLAMA_FACTORY),
    "rl_beta": _to("beta", AXOLOTL),
    # KTO's weights: TRL's own names (desirable_weight) are edge-tune's too
    "kto_desirable_weight": _to("desirable_weight", AXOLOTL),
    "kto_undesirable_weight": _to("undesirable_weight", AXOLOTL),
    "kto_chosen_weight": _to("desirable_weight", LLAMA_FACTORY),
    "kto_rejected_weight": _to("undesirable_weight", LLAMA_FACTORY),
    # GRPO: TRL's GRPOConfig names are edge-tune's; its weights are numbers, edge-tune's text
    "reward_weights": _to("reward_weights", TRL, lambda v: [_show(x) for x in v]
                          if isinstance(v, list) else v),
    "template": _to("chat_template", LLAMA_FACTORY, _template),
    # --- what edge-tune does anyway (a note), or cannot do (a warning) ----------------------
    "model_type": _moot(AXOLOTL, "the architecture is read from the model"),
    "tokenizer_type": _moot(AXOLOTL, "the model's own tokenizer is used"),
    "trust_remote_code": _moot(HF, "no remote code is run", ok=_off),
    "strict": _moot(AXOLOTL, "Axolotl's own check of its config"),
    "dataset_prepared_path": _moot(AXOLOTL, "edge-tune caches nothing it must be told of"),
    "do_train": _moot(LLAMA_FACTORY, "train trains"),
    "train": _moot(MLX_LM, "train trains"),
    "dtype": _moot(UNSLOTH, "precision is chosen by --precision"),
    "torch_dtype": _moot(TRL, "precision is chosen by --precision"),
    "bias": _moot(UNSLOTH, "LoRA trains no biases", ok=lambda v: v == "none"),
    "loftq_config": _moot(UNSLOTH, "no LoftQ initialisation", ok=_off),
    "random_state": _moot(UNSLOTH, "--seed seeds LoRA's initialisation too"),
    "logging_steps": _moot(HF, "every step is logged"),
    "steps_per_report": _moot(MLX_LM, "every step is logged"),
    "plot_loss": _moot(LLAMA_FACTORY, "RUN/loss.png is always drawn"),
    "save_gguf": _moot(UNSLOTH, "every run writes adapter.gguf; `export` writes more"),
    "save_model": _moot(UNSLOTH, "every run is saved"),
    "save_method": _moot(UNSLOTH, "`export RUN --merge` writes a merged model"),
    "adapter_file": _moot(UNSLOTH, "the adapter is RUN/adapter and RUN/adapter.gguf"),
    "save_path": _moot(UNSLOTH, "the run directory is --out"),
    "overwrite_output_dir": _moot(LLAMA_FACTORY, "a run never overwrites another"),
    "flash_attention": _moot(AXOLOTL, "the backend picks its attention"),
    "sdp_attention": _moot(AXOLOTL, "the backend picks its attention"),
    "attn_implementation": _moot(TRL, "the backend picks its attention"),
    "tf32": _moot(AXOLOTL, "the backend picks its matmul precision"),
    "pad_to_sequence_len": _moot(AXOLOTL, "batches are packed or length-grouped"),
    "group_by_length": _moot(HF, "--no-pack groups batches by length"),
    "val_batches": _moot(MLX_LM, "validation reads the whole validation set"),
    "test": _moot(MLX_LM, "`edge-tune eval RUN` scores the test split", ok=_off),
    "test_batches": _moot(MLX_LM, "`edge-tune eval RUN` scores the test split"),
    "clear_cache_threshold": _moot(MLX_LM, "mlx's cache is the backend's"),
    "optimizer_config": _moot(MLX_LM, "the optimizer is AdamW", ok=lambda v: not v or all(
        not o for o in (v.values() if isinstance(v, dict) else [v]))),
    "wandb_project": _moot(AXOLOTL, "--report-to wandb names its own project"),
    "project_name": _moot(MLX_LM, "--report-to wandb names its own project"),
    "num_layers": _moot(MLX_LM, "edge-tune adapts every block (mlx-lm's -1)",
                        ok=lambda v: v == -1),
    "load_in_4bit": _moot(f"{AXOLOTL}, {UNSLOTH}, {TRL}", "only the unsloth backend loads the "
                          "base in 4-bit (it always does); cpu and mlx train the "
                          "dequantized base", ok=_off),
    "load_in_8bit": _moot(f"{AXOLOTL}, {TRL}", "no 8-bit loading", ok=_off),
    "fp16": _moot(f"{AXOLOTL}, {TRL}", "training is fp32 or bf16 (--precision)", ok=_off),
    # the names of the schedule, optimizer and decay settings; another spelling of a value
    # (adamw_torch, constant_with_warmup) is read through SPELLINGS, one no backend has is
    # ignored with a warning
    "optim": _to("optimizer", HF, soft=True),
    "optimizer": _to("optimizer", f"{AXOLOTL}, {MLX_LM}", soft=True),
    "lr_scheduler_type": _to("lr_scheduler", HF, soft=True),
    "lr_scheduler": _to("lr_scheduler", AXOLOTL, soft=True),
    "lr_schedule": _to("lr_scheduler", MLX_LM, lambda v: _mlx_schedule(v), soft=True),
    "weight_decay": _to("weight_decay", HF),
    "warmup_ratio": _to("warmup_ratio", HF),
    "save_total_limit": _to("save_total_limit", HF),
    "max_grad_norm": _moot(HF, "gradients are clipped at norm 1", ok=lambda v: v in (1, 1.0)),
    "pref_loss": _moot(LLAMA_FACTORY, "DPO's sigmoid loss; for ORPO say stage: orpo",
                       ok=lambda v: v == "sigmoid"),
    "eval_sample_packing": _moot(AXOLOTL, "validation batches as training's"),
    "overwrite_cache": _moot(LLAMA_FACTORY, "edge-tune caches nothing it must be told of"),
    "preprocessing_num_workers": _moot(LLAMA_FACTORY, "data is read in the command"),
    "dataloader_num_workers": _moot(HF, "data is read in the command"),
    "save_only_model": _moot(LLAMA_FACTORY, "checkpoints keep the optimizer for --resume"),
    "ddp_timeout": _moot(LLAMA_FACTORY, "torchrun's defaults (--nproc)"),
    "eval_strategy": _moot(HF, "validation runs every eval_every steps"),
    "save_strategy": _moot(HF, "checkpoints every save_every steps"),
    "eos_token": _moot(TRL, "the chat template's end of turn ends an answer"),
    "special_tokens": _never(AXOLOTL, "the model's own special tokens are used"),
    "loss_watchdog_threshold": _never(AXOLOTL, "a non-finite loss stops the run"),
    "loss_watchdog_patience": _never(AXOLOTL, "a non-finite loss stops the run"),
    "early_stopping_patience": _never(HF, "the run trains its steps"),
    "resume_from_checkpoint": _never(HF, "use `train --resume RUN`"),
    "resume_adapter_file": _never(MLX_LM, "use `train --resume RUN`"),
    "lora_modules_to_save": _never(TRL, "a GGUF LoRA has no full copies of layers"),
    "quantization": _never(UNSLOTH, "use `edge-tune export RUN --quant Q4_K_M`"),
    "push_model": _moot(UNSLOTH, "edge-tune uploads nothing", ok=_off),
    "push_to_hub": _moot(HF, "edge-tune uploads nothing", ok=_off),
    "hub_path": _moot(UNSLOTH, "edge-tune uploads nothing", ok=_off),
    "hub_model_id": _moot(HF, "edge-tune uploads nothing", ok=_off),
    "deepspeed": _never(f"{AXOLOTL}, {LLAMA_FACTORY}", "use --nproc / --nnodes (torchrun)"),
    "fsdp": _never(AXOLOTL, "use --nproc / --nnodes (torchrun)"),
    "evals_per_epoch": _never(AXOLOTL, "use eval_every (steps)"),
    "saves_per_epoch": _never(AXOLOTL, "use save_every (steps)"),
    "hf_dataset": _never(MLX_LM, "give data: as a file, folder or hub ID"),
}


# the keys read together with another (see translate): they set nothing on their own
_GROUPED = {"lora_parameters", "datasets", "dataset_name", "dataset_config", "dataset_dir",
            "dataset_train_split", "lr_schedule"}
KNOWN = set(ALIASES) | _GROUPED

# --- presets: the tools' own defaults ------------------------------------------------------
# Each is the tool's default for a LoRA SFT run, in edge-tune's settings; docs/coming-from.md
# has the table with its sources. Settings a tool has no equivalent for keep edge-tune's.
PRESETS: dict[str, dict[str, Any]] = {
    "edge-tune": {},
    # unsloth-cli.py's argparse defaults (the notebooks use the same, with max_steps 60)
    "unsloth": {"rank": 16, "alpha": 16.0, "lora_dropout": 0.0, "lr": 2e-4, "batch_size": 2,
                "grad_accum": 4, "warmup_steps": 5, "seq_len": 2048, "seed": 3407,
                "grad_checkpoint": True, "lr_scheduler": "linear", "weight_decay": 0.01},
    # mlx_lm.lora's CONFIG_DEFAULTS (0.32): lora_parameters rank 8, scale 20 (alpha 160),
    # every linear layer of the last 16 blocks, constant lr, loss on every token
    "mlx-lm": {"rank": 8, "alpha": 160.0, "lora_dropout": 0.0, "lr": 1e-5, "batch_size": 4,
               "grad_accum": 1, "max_steps": 1000, "seq_len": 2048, "seed": 0,
               "eval_every": 200, "save_every": 100, "train_on": "all",
               "target_modules": [ALL_LINEAR], "warmup_steps": 0, "lr_scheduler": "constant"},
    # TRL's SFTConfig (learning_rate 2e-5, max_length 1024, gradient checkpointing on, no
    # packing; TrainingArguments' batch 8, 3 epochs, seed 42, linear decay) with ModelConfig's
    # LoRA (lora_r 16, lora_alpha 32, lora_dropout 0.05); loss on every token of a
    # conversation (assistant_only_loss False)
    "trl": {"rank": 16, "alpha": 32.0, "lora_dropout": 0.05, "lr": 2e-5, "batch_size": 8,
            "grad_accum": 1, "epochs": 3.0, "seq_len": 1024, "seed": 42, "warmup_steps": 0,
            "pack": False, "train_on": "all", "lr_scheduler": "linear", "weight_decay": 0.0,
            "grad_checkpoint": True},
}


def flag_aliases(setting: str) -> tuple[str, ...]:
    """The other tools' command-line spellings of a setting's option, e.g. ``lr`` ->
    ``("--learning-rate",)``: the :data:`ALIASES` marked ``flag`` (values as they are)."""
    return tuple("--" + key.replace("_", "-") for key, a in ALIASES.items()
                 if a.flag and a.setting == setting)


def step_size(lr: float, alpha: float, rank: int, rslora: bool = False) -> float:
    """The effective step of a LoRA update: lr x alpha/r (alpha/sqrt(r) with rsLoRA), what
    a copied recipe changes when its lr, alpha and rank come from different tools."""
    return lr * alpha / (rank ** 0.5 if rslora else rank)


@dataclass
class Translation:
    """What :func:`translate` made of a document. ``values``: settings by TrainConfig field
    (raw, to be coerced); ``lines``: one per foreign key, what it became; ``ignored``: (key,
    why) for each key edge-tune cannot honour or does not know."""

    values: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    setters: dict[str, str] = field(default_factory=dict)  # setting -> the key that set it


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return ",".join(_show(x) for x in v)
    return str(v)


def translate(doc: dict, names: set[str], source: str,
              valid: Callable[[str, Any], bool] = lambda setting, value: True) -> Translation:
    """``doc`` (a parsed config) as edge-tune's settings. ``names``: the TrainConfig fields,
    taken as they are (``-`` read as ``_``). A key no tool here knows is ignored with a
    warning when the document has another tool's keys, else DataError (a typo in an
    edge-tune config). DataError, naming ``source`` and the key, for a value that does not
    convert or two keys that set one setting differently. ``valid(setting, value)``: whether
    edge-tune takes that value (a ``soft`` alias's other values are ignored)."""
    r = _Reader(source, valid, names)
    flat = {key.replace("-", "_"): value for key, value in doc.items()}
    foreign = any(k not in names and k in KNOWN for k in flat)
    for key, value in flat.items():
        if value is None:  # YAML's null: the tool's default, so not set
            continue
        if key in names and foreign and key in ALIASES and ALIASES[key].convert:
            r.alias(key, value)  # another tool's form of it: report_to: [wandb]
        elif key in names:
            spelled = SPELLINGS.get(key, {}).get(value, value) if isinstance(value, str) \
                else value
            if foreign and key in SPELLINGS and not valid(key, spelled):
                r.t.ignored.append((key, f"{value}: not a value edge-tune's {key} takes"))
                continue
            r.put(key, key, spelled, value)
            if spelled != value:
                r.t.lines.append(f"{key}: {value} -> {key} {spelled}")
            elif foreign:  # beside another tool's keys, say which are edge-tune's own
                r.t.lines.append(f"{key}: {_show(value)} -> {key} (edge-tune's own key)")
        elif key in _GROUPED:
            r.grouped(key, value, flat)
        elif key in ALIASES:
            r.alias(key, value)
        elif foreign:
            r.t.ignored.append((key, "not a key of edge-tune, Axolotl, LLaMA-Factory, Unsloth, "
                                     "mlx-lm or TRL that edge-tune knows"))
        else:
            raise DataError(f"{source}: unknown key {key!r} (expected one of "
                            f"{', '.join(sorted(names))}, or another tool's: "
                            "docs/coming-from.md)")
    r.own_template()
    r.end_of_turn()
    r.t.setters = dict(r.setter)
    if r.setter.get("data") == "dataset":
        _dataset_info_names(r, flat)
    if "lora_rank" in flat and "alpha" not in r.t.values and "rank" in r.t.values:
        # LLaMA-Factory's lora_alpha default is lora_rank x 2 (edge-tune's is 32)
        rank = r.t.values["rank"]
        if isinstance(rank, int) and not isinstance(rank, bool):
            r.put("lora_rank", "alpha", float(2 * rank), rank,
                  " (LLaMA-Factory's default lora_alpha: 2 x lora_rank)")
    return r.t


def _same(a: Any, b: Any) -> bool:
    """Two values of a setting the same, numbers by value (YAML reads ``1e-5`` as text)."""
    if a == b:
        return True
    try:
        return not isinstance(a, bool) and not isinstance(b, bool) and float(a) == float(b)
    except (TypeError, ValueError):
        return False


class _Reader:
    """:func:`translate`'s state: the settings so far and which key set each."""

    def __init__(self, source: str, valid: Callable[[str, Any], bool],
                 names: set[str]) -> None:
        self.t, self.source, self.valid, self.names = Translation(), source, valid, names
        self.setter: dict[str, str] = {}  # setting -> the key that set it
        self.eos: list[tuple[str, Any]] = []  # Axolotl's train_on_eos, read once train_on is

    def ignore(self, key: str, why: str) -> None:
        self.t.ignored.append((key, why))

    def note(self, key: str, value: Any, what: str) -> None:
        self.t.lines.append(f"{key}: {_show(value)} -> {what}")

    def put(self, key: str, setting: str, value: Any, raw: Any, note: str = "") -> None:
        t = self.t
        if setting in self.setter and not _same(t.values[setting], value):
            raise DataError(f"{self.source}: {key} and {self.setter[setting]} both set "
                            f"{setting} ({_show(value)} vs {_show(t.values[setting])}): keep "
                            "one")
        self.setter[setting], t.values[setting] = key, value
        if key != setting:
            t.lines.append(f"{key}: {_show(raw)} -> {setting} {_show(value)}{note}")

    def bad(self, key: str, value: Any, expected: str = "") -> DataError:
        return DataError(f"{self.source}: {key}: {value!r} is not a value edge-tune can take"
                         + (f" (expected {expected})" if expected else ""))

    def grouped(self, key: str, value: Any, flat: dict) -> None:
        if key == "lora_parameters":
            _lora_parameters(value, self)
        elif key == "datasets":
            _datasets(value, self)
        elif key == "lr_schedule":
            _lr_schedule(value, self, flat)
        elif key == "dataset_name":  # TRL's hub set: NAME[:CONFIG][@SPLIT] as edge-tune reads it
            config, split = flat.get("dataset_config"), flat.get("dataset_train_split")
            spec = str(value) + (f":{config}" if config else "") + (f"@{split}" if split else "")
            self.put(key, "data", spec, value)
        elif key == "dataset_dir":  # read with dataset (dataset_info_names)
            if "dataset" not in flat:
                self.t.ignored.append((key, "needs dataset"))
        elif "dataset_name" not in flat:  # dataset_config, dataset_train_split
            self.t.ignored.append((key, "needs dataset_name"))

    def alias(self, key: str, value: Any, a: Optional[Alias] = None) -> None:
        a, t, names = a or ALIASES[key], self.t, self.names
        if a.setting is None:
            if a.ok is None or a.ok(value):
                t.lines.append(f"{key}: {_show(value)} -> nothing to set ({a.why})")
            else:
                t.ignored.append((key, f"{_show(value)}: {a.why}"))
            return
        if key == "template" and isinstance(value, str) and value.lower() in OWN_TEMPLATE:
            t.lines.append(f"{key}: {value} -> the model's own chat template")
            return
        if a.setting not in names:
            t.ignored.append((key, f"{_show(value)}: edge-tune has no {a.setting} setting"))
            return
        try:
            converted = a.convert(value) if a.convert else value
            if isinstance(converted, str) and a.setting in SPELLINGS:
                converted = SPELLINGS[a.setting].get(converted, converted)
            if a.soft and not self.valid(a.setting, converted):
                raise ValueError
        except (TypeError, ValueError):
            if a.setting == "chat_template":
                t.ignored.append((key, f"{value}: no built-in template of that name (give "
                                       "--chat-template NAME|FILE)"))
            elif a.soft:
                t.ignored.append((key, f"{_show(value)}: not a value edge-tune's {a.setting} "
                                       "takes"))
            else:
                raise self.bad(key, value) from None
            return
        if converted is None:
            t.lines.append(f"{key}: {_show(value)} -> nothing to set")
        else:
            self.put(key, a.setting, converted, value)

    def end_of_turn(self) -> None:
        """Axolotl's ``train_on_eos``: ``turn`` (its default) is what edge-tune does, the end
        of each trained turn trained; ``all`` too when every token is (``train_on all``)."""
        for key, value in self.eos:
            if value == "turn" or (value == "all" and self.t.values.get("train_on") == "all"):
                self.note(key, value, "nothing to set (the end of each trained turn is "
                                      "trained)")
            else:
                self.ignore(key, f"{value}: edge-tune trains the end of each trained turn "
                                 "(Axolotl's turn)")

    def own_template(self) -> None:
        """Axolotl's ``chat_template`` names (qwen_25, tokenizer_default) in edge-tune's
        field of that name: as edge-tune's built-in names, or the model's own."""
        t, chat = self.t, self.t.values.get("chat_template")
        if self.setter.get("chat_template") != "chat_template" or not isinstance(chat, str):
            return
        if chat.lower() in OWN_TEMPLATE:
            del t.values["chat_template"]
            t.lines.append(f"chat_template: {chat} -> the model's own chat template")
        elif chat.lower() in TEMPLATES and TEMPLATES[chat.lower()] != chat:
            t.values["chat_template"] = TEMPLATES[chat.lower()]
            t.lines.append(f"chat_template: {chat} -> chat_template {t.values['chat_template']}")


def _dataset_info_names(r: _Reader, flat: dict) -> None:
    """LLaMA-Factory's ``dataset: a,b``: names in ``DATASET_DIR/dataset_info.json`` (``data/``
    by default, from the working directory, as LLaMA-Factory reads it), each read as its
    ``file_name`` there or its ``hf_hub_url`` (``subset``, ``split``) as a hub ID. A name that
    is a file, or a directory without that file, is left as it is."""
    import json
    from pathlib import Path

    given = r.t.values["data"]
    names = given if isinstance(given, list) else [given]
    base = Path(str(flat.get("dataset_dir") or "data"))
    try:
        info = json.loads((base / "dataset_info.json").read_text())
    except (OSError, ValueError):
        if flat.get("dataset_dir"):
            r.t.ignored.append(("dataset_dir", f"{base}: no dataset_info.json to read "
                                               "dataset's names from"))
        return
    sources = []
    for name in names:
        entry = info.get(name) if isinstance(info, dict) and not Path(name).exists() else None
        if not isinstance(entry, dict):
            sources.append(name)
        elif entry.get("file_name"):
            sources.append(str(base / entry["file_name"]))
        elif entry.get("hf_hub_url"):
            sources.append(str(entry["hf_hub_url"]) + (
                f":{entry['subset']}" if entry.get("subset") else "") + (
                f"@{entry['split']}" if entry.get("split") else ""))
        else:
            sources.append(name)
            r.t.ignored.append(("dataset", f"{name}: its dataset_info.json entry has no "
                                           "file_name or hf_hub_url"))
    if sources != names:
        r.t.values["data"] = sources[0] if len(sources) == 1 else sources
        r.t.lines.append(f"dataset: {_show(names)} -> data {_show(sources)} (from "
                         f"{base / 'dataset_info.json'})")


def _lora_parameters(value: Any, r: _Reader) -> None:
    """mlx-lm's ``lora_parameters: {rank, scale, dropout, keys}``: scale multiplies the
    update itself (y + scale * x A B), so PEFT's alpha is scale x rank."""
    put, bad = r.put, r.bad
    if not isinstance(value, dict):
        raise bad("lora_parameters", value, "a mapping of rank, scale, dropout, keys")
    rank = value.get("rank", 8)  # mlx-lm's default rank
    if "rank" in value:
        put("lora_parameters.rank", "rank", rank, rank)
    if "scale" in value:
        try:
            alpha = float(value["scale"]) * int(rank)
        except (TypeError, ValueError):
            raise bad("lora_parameters.scale", value["scale"], "a number") from None
        put("lora_parameters.scale", "alpha", alpha, value["scale"], f" (scale x rank {rank})")
    if "dropout" in value:
        put("lora_parameters.dropout", "lora_dropout", value["dropout"], value["dropout"])
    if value.get("keys"):
        try:
            targets = _targets(value["keys"])
        except ValueError:
            raise bad("lora_parameters.keys", value["keys"], "module names") from None
        put("lora_parameters.keys", "target_modules", targets, value["keys"])
    for key in sorted(set(value) - {"rank", "scale", "dropout", "keys"}):
        if value[key] is not None:
            r.ignore(f"lora_parameters.{key}", "not a key of mlx-lm's lora_parameters that "
                                               "edge-tune knows")


def _number(value: Any, key: str, r: _Reader) -> float:
    if isinstance(value, bool):
        raise r.bad(key, value, "a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise r.bad(key, value, "a number") from None


def _lr_schedule(value: Any, r: _Reader, flat: dict) -> None:
    """mlx-lm's ``lr_schedule: {name, warmup, warmup_init, arguments}``: ``name`` the decay
    (``cosine_decay`` -> cosine); ``warmup`` -> warmup_steps; ``arguments`` are the decay's
    (cosine_decay: peak, decay steps, end lr (0); linear_schedule: peak, end, steps): the peak
    -> lr, the rest checked against edge-tune's decay over the whole run to a tenth of the
    peak (else a warning). mlx-lm's warm-up rises from ``warmup_init`` (0), edge-tune's
    from 0."""
    if not isinstance(value, dict):
        r.alias("lr_schedule", value)
        return
    name, warmup = value.get("name"), value.get("warmup")
    if name is not None:
        r.alias("lr_schedule.name", name, ALIASES["lr_schedule"])
    if warmup is not None:
        r.put("lr_schedule.warmup", "warmup_steps", warmup, warmup)
    init = value.get("warmup_init")
    if init is not None:
        if not warmup:
            r.note("lr_schedule.warmup_init", init, "nothing to set (no warm-up)")
        elif _number(init, "lr_schedule.warmup_init", r) == 0:
            r.note("lr_schedule.warmup_init", init, "nothing to set (the warm-up rises from 0)")
        else:
            r.ignore("lr_schedule.warmup_init", f"{_show(init)}: edge-tune's warm-up rises "
                                                "from 0 to the peak")
    args = value.get("arguments")
    if args is not None:
        _schedule_arguments(str(name), args, r, flat, int(warmup or 0))
    for key in sorted(set(value) - {"name", "warmup", "warmup_init", "arguments"}):
        if value[key] is not None:
            r.ignore(f"lr_schedule.{key}", "not a key of mlx-lm's lr_schedule that edge-tune "
                                           "knows")


def _schedule_arguments(name: str, args: Any, r: _Reader, flat: dict, warmup: int) -> None:
    key = "lr_schedule.arguments"
    if not isinstance(args, list) or not args:
        raise r.bad(key, args, "a list: the peak learning rate, then the decay's own")
    peak = _number(args[0], f"{key}[0]", r)
    r.put(f"{key}[0]", "lr", peak, args[0], " (the schedule's peak)")
    if name not in ("cosine_decay", "linear_schedule"):
        if len(args) > 1:
            r.ignore(f"{key}[1:]", f"{_show(args[1:])}: {name}'s own, not a decay edge-tune has")
        return
    # cosine_decay(init, decay_steps, end=0); linear_schedule(init, end, steps)
    steps, end = (args[1:2], args[2:3]) if name == "cosine_decay" else (args[2:3], args[1:2])
    at_steps, at_end = (1, 2) if name == "cosine_decay" else (2, 1)
    run = flat.get("iters") or flat.get("max_steps")
    if steps:
        n = _number(steps[0], f"{key}[{at_steps}]", r)
        if isinstance(run, int) and n in (run, run - warmup):
            r.note(f"{key}[{at_steps}]", steps[0], "nothing to set (the decay spans the run)")
        else:
            r.ignore(f"{key}[{at_steps}]", f"{_show(steps[0])}: edge-tune decays over the "
                                           "whole run after warm-up (max_steps or epochs)")
    final = _number(end[0], f"{key}[{at_end}]", r) if end else 0.0
    if abs(final - peak / 10) <= 1e-9 * max(peak, 1e-30):
        if end:
            r.note(f"{key}[{at_end}]", end[0], "nothing to set (a tenth of the peak)")
    else:
        r.ignore(f"{key}[{at_end}]" if end else key,
                 f"{_show(final)}: edge-tune's {SPELLINGS['lr_scheduler'][name]} decay ends at "
                 f"a tenth of the peak ({_show(peak / 10)}), not at this end lr")


# Axolotl dataset types -> edge-tune's --format ("chat_template" and the like: auto)
_DATASET_TYPES = {"alpaca": "alpaca", "completion": "text", "sharegpt": "sharegpt",
                  "chat_template": "auto", "input_output": "auto"}
_HUB = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # = edge_tune.data.layouts.HUB_SPEC's name
_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt", ".arrow")
_ASSISTANT, _USER = {"assistant", "gpt", "model"}, {"user", "human"}
# a datasets entry's keys read by _dataset (the others are named as ignored)
_DATASET_KEYS = {"path", "type", "name", "split", "field_messages", "message_property_mappings",
                 "message_field_role", "message_field_content", "roles_to_train",
                 "train_on_eos", "ds_type"}


def _is_hub(path: str) -> bool:
    """A hub dataset ID, as edge-tune's data reader tells one from a file."""
    from pathlib import Path

    p = Path(path)
    return bool(_HUB.fullmatch(path)) and not p.exists() and \
        p.suffix.lower() not in _FILE_SUFFIXES and not p.parent.exists()


def _datasets(value: Any, r: _Reader) -> None:
    """Axolotl's ``datasets: [{path, type, ...}, ...]``: the paths as --data (a hub set's
    ``name`` and ``split`` as ``NAME:CONFIG@SPLIT``); one type for all as --format; each
    entry's other keys (:func:`_dataset`) mapped or named."""
    if not isinstance(value, list) or not all(isinstance(d, dict) and d.get("path")
                                              for d in value):
        raise r.bad("datasets", value, "a list of {path, type}")
    paths = [str(d["path"]) for d in value]
    sources = [_source(d, f"datasets[{i}]", r) for i, d in enumerate(value)]
    r.put("datasets", "data", sources[0] if len(sources) == 1 else sources, paths)
    types = {str(d.get("type", "")) for d in value}
    if len(types) == 1 and (kind := next(iter(types))) in _DATASET_TYPES:
        if _DATASET_TYPES[kind] != "auto":
            r.put("datasets.type", "format", _DATASET_TYPES[kind], kind)
        else:
            r.t.lines.append(f"datasets.type: {kind} -> format auto (read from the records)")
    elif types - {""}:
        r.ignore("datasets.type", f"{_show(sorted(types))}: the format is read from the "
                                  "records (or say --format)")
    for i, d in enumerate(value):
        _dataset(d, f"datasets[{i}]", r)


def _source(d: dict, at: str, r: _Reader) -> str:
    """One entry's source: a hub set's ``name`` (config) and ``split`` (``train[:10]`` as
    ``datasets`` reads it) added as ``:CONFIG@SPLIT``; for a local file they are ignored."""
    path = str(d["path"])
    hub = _is_hub(path)
    for key, mark in (("name", ":"), ("split", "@")):
        part = d.get(key)
        if part is None:
            continue
        if hub:
            path += f"{mark}{part}"
            r.note(f"{at}.{key}", part, f"data {path}")
        else:
            r.ignore(f"{at}.{key}", f"{_show(part)}: a hub dataset's {key}; {d['path']} is a "
                                    "local file, read whole" + (
                                        " (--max-samples N reads its first N)"
                                        if key == "split" else ""))
    return path


def _dataset(d: dict, at: str, r: _Reader) -> None:
    """One Axolotl ``datasets`` entry's keys beyond path, type, name and split: its columns
    (``field_messages``, ``message_property_mappings``) as --columns, ``roles_to_train`` as
    --train-on, ``train_on_eos`` (read at the end), the rest named as ignored."""
    mapping = d.get("message_property_mappings") or {}
    if not isinstance(mapping, dict):
        raise r.bad(f"{at}.message_property_mappings", mapping, "a mapping of role, content")
    role = mapping.get("role", d.get("message_field_role") or "role")
    content = mapping.get("content", d.get("message_field_content") or "content")
    turns = {("role", "content"): "messages", ("from", "value"): "conversations"}.get(
        (role, content))
    for key in ("message_property_mappings", "message_field_role", "message_field_content"):
        if d.get(key) is None:
            continue
        if turns:
            r.note(f"{at}.{key}", d[key], f"nothing to set (edge-tune reads {role}/{content} "
                                          "turns)")
        else:
            r.ignore(f"{at}.{key}", f"{_show(d[key])}: edge-tune reads a turn's role/content "
                                    "(OpenAI) or from/value (ShareGPT); rename the fields in "
                                    "the data")
    field_ = d.get("field_messages")
    if field_ is not None:
        want = turns or "messages"
        if field_ == want:
            r.note(f"{at}.field_messages", field_, f"nothing to set (edge-tune reads {want})")
        else:
            r.put(f"{at}.field_messages", "columns", f"{field_}={want}", field_)
    roles = d.get("roles_to_train")
    if roles is not None:
        names = {str(x).lower() for x in roles} if isinstance(roles, list) else {str(roles)}
        if names and names <= _ASSISTANT:
            r.put(f"{at}.roles_to_train", "train_on", "assistant", roles)
        elif names & _ASSISTANT and names & _USER:
            r.put(f"{at}.roles_to_train", "train_on", "all", roles,
                  " (every token: system turns and the template's too)")
        else:
            r.ignore(f"{at}.roles_to_train", f"{_show(roles)}: edge-tune trains the assistant "
                                             "turns or every token (--train-on)")
    if d.get("train_on_eos") is not None:
        r.eos.append((f"{at}.train_on_eos", d["train_on_eos"]))
    if d.get("ds_type") is not None:
        r.note(f"{at}.ds_type", d["ds_type"], "nothing to set (read from the file's suffix)")
    for key in sorted(set(d) - _DATASET_KEYS):
        if d[key] is not None:
            r.ignore(f"{at}.{key}", "not a key of an Axolotl dataset that edge-tune knows")
