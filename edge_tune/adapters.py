"""Which adapter, which base, which chat template: the one resolver every command uses.

An adapter is given as an edge-tune run directory (``manifest.json`` names its PEFT adapter,
its ``adapter.gguf``, its base and chat template), a PEFT directory (``adapter_config.json``),
an mlx-lm adapter directory (``adapters.safetensors``; a PEFT copy is made in the cache) or an
adapter ``.gguf`` (its run's manifest, if it sits in one, is read beside it). The base is
``--base`` when given, else the run's, else what the adapter's config names, else (chat only)
the embedded default model. :func:`open_engine` loads a resolved target in llama.cpp.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edge_tune import manifest as manifest_mod
from edge_tune import models
from edge_tune.errors import EdgeTuneError
from edge_tune.events import EventSink, Log, ignore
from edge_tune.fsutil import sha256_file
from edge_tune.manifest import Manifest
from edge_tune.templates import choice as template_choice
from edge_tune.templates.choice import system_mode_option


def run_base_gguf(man: Optional[Manifest]) -> Optional[Path]:
    """The GGUF base a run's manifest records, or None (no manifest, or trained on HF
    weights that were not converted)."""
    gg = man.base.gguf if man is not None else None
    return Path(gg) if gg else None


def named_base(peft_dir: Path) -> Optional[str]:
    """``base_model_name_or_path`` of a PEFT adapter's ``adapter_config.json``, or None."""
    try:
        cfg = json.loads((Path(peft_dir) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None


def peft_adapter(adapter: Path) -> tuple[Path, Optional[Manifest]]:
    """(PEFT adapter dir, run manifest or None) for a run directory, a PEFT directory or an
    mlx-lm adapter directory. Raises EdgeTuneError for anything else."""
    adapter = Path(adapter)
    if not adapter.exists():
        raise EdgeTuneError(f"{adapter}: no such adapter directory")
    man = manifest_mod.read(adapter) if adapter.is_dir() else None
    if man is not None:
        return _readable_peft(adapter / man.adapter.peft), man
    from edge_tune.converters.formats import mlx_to_peft

    if mlx_to_peft.is_mlx_adapter_dir(adapter):
        return _peft_copy_of_mlx(adapter), None
    if (adapter / "adapter_config.json").is_file():
        return _readable_peft(adapter), None
    raise EdgeTuneError(f"{adapter}: neither an edge-tune run directory (manifest.json), a "
                        "PEFT adapter directory (adapter_config.json) nor an mlx-lm adapter "
                        "directory (adapters.safetensors)")


PEFT_WEIGHTS = "adapter_model.safetensors"


def _readable_peft(peft_dir: Path) -> Path:
    """``peft_dir``, once its weights file's safetensors header reads and covers the file (a
    truncated or overwritten copy fails here in one line, before torch or PEFT loads it).
    A missing file is left to the loaders, which say what they expected instead."""
    weights = Path(peft_dir) / PEFT_WEIGHTS
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="numpy"):
                pass
        except Exception as exc:  # noqa: BLE001 -- SafetensorError, OSError: all unreadable
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise EdgeTuneError(f"{weights}: unreadable safetensors file ({detail}; expected "
                                "the adapter weights whole, as training saved them)") from None
    return Path(peft_dir)


def _peft_copy_of_mlx(mlx_dir: Path) -> Path:
    """A PEFT copy of an mlx-lm adapter (any, including stock ``mlx_lm lora`` output), kept in
    the cache by content hash so the user's directory is left as it was."""
    from edge_tune.converters.formats import mlx_to_peft
    from edge_tune.fsutil import cache_dir

    digest = sha256_file(mlx_dir / mlx_to_peft.WEIGHTS)[:16]
    cfg_digest = sha256_file(mlx_dir / mlx_to_peft.CONFIG)[:8]
    target = cache_dir() / "mlx-peft" / f"{digest}-{cfg_digest}"
    if not (target / "adapter_config.json").is_file():
        mlx_to_peft.convert(mlx_dir, target)
    return target


def conversion_base(peft_dir: Path, man: Optional[Manifest], base: Optional[Path]):
    """(:class:`~edge_tune.converters.formats.base_info.BaseInfo`, GGUF path or None) of the base a
    PEFT adapter is converted against: ``--base`` (GGUF or HF dir), else the run's GGUF,
    else the HF directory its adapter config names."""
    from edge_tune.converters.formats import base_info

    if base is not None:
        ref = models.resolve(str(base))
        if ref.gguf is not None:
            return base_info.from_gguf(ref.gguf), ref.gguf
        if ref.hf_dir is not None:
            return base_info.from_hf_dir(ref.hf_dir), None
        raise EdgeTuneError(f"--base {base}: expected a GGUF file or an HF model directory")
    if run_base_gguf(man) is not None:
        path = run_base_gguf(man)
        return base_info.from_gguf(path), path
    guess = Path(str(named_base(peft_dir) or ""))
    if str(guess) and (guess / "config.json").is_file():
        return base_info.from_hf_dir(guess), None
    raise EdgeTuneError(f"{peft_dir}: cannot tell which base model this adapter is for; "
                        "pass --base BASE.gguf")


def merge_base(man: Optional[Manifest], base: Optional[Path]) -> Optional[Path]:
    """The GGUF base a merge starts from: --base, else the run's base (None: neither)."""
    if base is not None:
        ref = models.resolve(str(base))
        if ref.gguf is None:
            raise EdgeTuneError(f"--base {base}: --merge needs a GGUF base (make one from an HF "
                                "model with `edge-tune convert-base`)")
        return ref.gguf
    return run_base_gguf(man)


def vllm_base(peft_dir: Path, man: Optional[Manifest], base: Optional[Path]) -> str:
    """What ``vllm serve`` loads: a hub ID or an HF directory (vLLM's LoRA needs HF weights)."""
    if base is not None:
        ref = models.resolve(str(base))
        if ref.gguf is not None:
            raise EdgeTuneError(f"--base {base}: vLLM serves LoRA adapters on HF weights; pass "
                                "an HF model directory or hub ID")
        return ref.hub_id or str(ref.hf_dir)
    rec = man.base if man is not None else manifest_mod.Base()
    if rec.hub_id or rec.hf_dir:
        return rec.hub_id or rec.hf_dir
    guess = named_base(peft_dir)
    if guess:
        return str(guess)
    raise EdgeTuneError(f"{peft_dir}: cannot tell which base model this adapter is for; pass "
                        "--base HF_DIR_OR_HUB_ID")


@dataclass
class ChatTarget:
    """What llama.cpp loads to chat or serve: a base GGUF, an adapter GGUF (or None), the run's
    manifest (or None), the chat template and the system mode."""
    base: Path
    adapter: Optional[Path]
    manifest: Optional[Manifest]
    # --chat-template, else the run's; None: the base GGUF's own (or none at all)
    chat_template: Optional["template_choice.ChatTemplate"] = None
    system_mode: str = "keep"  # --system-mode, else the run's

    @property
    def stop_tokens(self) -> tuple:
        return tuple(self.manifest.stop_tokens) if self.manifest is not None else ()

    @property
    def training_system(self) -> Optional[str]:
        """The system prompt every training record of the run shared (its manifest's
        ``data.system``): what a conversation without a system message is sent with."""
        return self.manifest.data.system if self.manifest is not None else None


def resolve_chat(adapter: Optional[Path], base: Optional[str],
                 chat_template: Optional[str] = None,
                 system_mode: Optional[str] = None) -> ChatTarget:
    """Work out base GGUF + adapter GGUF from a run dir / adapter file / --base, and the chat
    template and system mode (``--chat-template`` / ``--system-mode``, else the run's)."""
    man = None
    adapter_gguf = None
    if adapter is not None:
        adapter = Path(adapter)
        if adapter.is_dir():
            man = manifest_mod.read(adapter)
            if man is None:
                raise EdgeTuneError(f"--adapter {adapter}: not an edge-tune run directory (no "
                                    "manifest.json); pass the adapter .gguf or export it first")
            if man.full:  # a full fine-tuning run is a model: chat with it as the base
                return _full_run_target(adapter, man, base, chat_template, system_mode)
            gg = man.adapter.gguf
            if not gg:
                raise EdgeTuneError(f"--adapter {adapter}: the run has no adapter.gguf; run "
                                    f"`edge-tune export {adapter} --base BASE.gguf`")
            adapter_gguf = adapter / gg
        elif adapter.is_file():
            adapter_gguf = adapter
            man = manifest_mod.read(adapter.parent)
        else:
            raise EdgeTuneError(f"--adapter {adapter}: no such file or directory")
    if base is not None and (full := _full_run(Path(base))) is not None:
        if adapter is not None:
            raise EdgeTuneError(f"--base {base}: a full fine-tuning run is a whole model of "
                                f"its own, not a base for --adapter {adapter}; use the run "
                                f"alone (--base {base}), or the adapter on its own base "
                                "(drop --base)")
        return _full_run_target(Path(base), full, None, chat_template, system_mode)
    if base is not None:
        ref = models.resolve(base)
        if ref.gguf is None:
            raise EdgeTuneError(f"--base {base}: chat runs on llama.cpp and needs a GGUF base")
        base_path = ref.gguf
    elif run_base_gguf(man) is not None:
        base_path = run_base_gguf(man)
        if not base_path.exists() and man.base.sha256 == models.DEFAULT_SHA256:
            base_path = models.default_gguf()  # run copied to another machine: refetch
    else:
        base_path = models.default_gguf()
    mode = system_mode_option(system_mode) or (
        man.hyperparameters.system_mode if man is not None else None) or "keep"
    chosen = template_choice.choose(chat_template, man)
    from edge_tune.templates.vocabulary import require_template_tokens

    require_template_tokens(chosen, models.ModelRef(str(base_path), gguf=Path(base_path)))
    return ChatTarget(base_path, adapter_gguf, man, chosen, mode)


def open_engine(target: ChatTarget, on_event: EventSink = ignore,
                training_system: bool = True, **engine_kw):
    """Load the base in llama.cpp and activate the (validated) adapter, if any.
    ``training_system``: a conversation without a system message gets the run's training
    system prompt (:attr:`ChatTarget.training_system`), as chat and serve send it; False for
    measurements that compare the base with the adapter on the prompts as they are (eval)."""
    from edge_tune.llama.engine import Engine

    engine = Engine(target.base, chat_template=target.chat_template.text if
                    target.chat_template else None, stop_tokens=target.stop_tokens,
                    system_mode=target.system_mode, **engine_kw)
    if training_system:
        engine.set_system(target.training_system)  # the run's, for a chat that has none
    if target.adapter is not None:
        try:
            engine.add_adapter(target.adapter, "adapter")
            engine.activate("adapter")
        except BaseException:
            engine.close()
            raise
        trained_on = engine.adapter_meta["adapter"].get("edge_tune.base_sha256")
        if trained_on and trained_on != sha256_file(target.base):
            on_event(Log(f"{target.adapter} was trained on a different base file than "
                         f"{target.base} (sha256 differs); answers may be off", "warning"))
    return engine


def _full_run(path: Path) -> Optional[Manifest]:
    """The manifest of a full fine-tuning run directory ``path``, else None."""
    man = manifest_mod.read(path) if path.is_dir() else None
    return man if man is not None and man.full else None


def _full_run_target(run: Path, man: Manifest, base: Optional[str],
                     chat_template: Optional[str], system_mode: Optional[str]) -> ChatTarget:
    """A full fine-tuning run as a chat target: its model GGUF is the base, with no adapter
    (as a merged export); the run's chat template and system mode as for any run."""
    if base is not None:
        raise EdgeTuneError(f"--base {base}: {run} is a full fine-tuning run, a whole model of "
                            "its own; drop --base")
    gg = man.model.gguf if man.model is not None else None
    if not gg or not (run / gg).is_file():
        raise EdgeTuneError(f"--adapter {run}: the full run has no model GGUF; run `edge-tune "
                            f"export {run}`")
    mode = system_mode_option(system_mode) or man.hyperparameters.system_mode or "keep"
    chosen = template_choice.choose(chat_template, man)
    from edge_tune.templates.vocabulary import require_template_tokens

    require_template_tokens(chosen, models.ModelRef(str(run / gg), gguf=run / gg))
    return ChatTarget(run / gg, None, man, chosen, mode)
