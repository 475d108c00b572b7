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
from edge_tune.errors import DataError, EdgeTuneError, UsageError
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
        raise UsageError(f"{adapter}: no such adapter directory")
    man = manifest_mod.read(adapter) if adapter.is_dir() else None
    if man is not None:
        return _readable_peft(adapter / man.adapter.peft), man
    from edge_tune.converters.formats import mlx_to_peft

    if mlx_to_peft.is_mlx_adapter_dir(adapter):
        return _peft_copy_of_mlx(adapter), None
    if (adapter / "adapter_config.json").is_file():
        return _readable_peft(adapter), None
    raise DataError(f"{adapter}: neither an edge-tune run directory (manifest.json), a "
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
            raise DataError(f"{weights}: unreadable safetensors file ({detail}; expected "
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
        raise UsageError("expected a GGUF file or an HF model directory",
                         setting="base", value=base)
    if run_base_gguf(man) is not None:
        path = run_base_gguf(man)
        return base_info.from_gguf(path), path
    guess = Path(str(named_base(peft_dir) or ""))
    if str(guess) and (guess / "config.json").is_file():
        return base_info.from_hf_dir(guess), None
    raise UsageError(f"{peft_dir}: cannot tell which base model this adapter is for; "
                     "pass --base BASE.gguf")


def merge_base(man: Optional[Manifest], base: Optional[Path]) -> Optional[Path]:
    """The GGUF base a merge starts from: --base, else the run's base (None: neither)."""
    if base is not None:
        ref = models.resolve(str(base))
        if ref.gguf is None:
            raise UsageError("--merge needs a GGUF base (make one from an HF "
                             "model with `edge-tune convert-base`)", setting="base", value=base)
        return ref.gguf
    return run_base_gguf(man)


def vllm_base(peft_dir: Path, man: Optional[Manifest], base: Optional[Path]) -> str:
    """What ``vllm serve`` loads: a hub ID or an HF directory (vLLM's LoRA needs HF weights)."""
    if base is not None:
        ref = models.resolve(str(base))
        if ref.gguf is not None:
            raise UsageError("vLLM serves LoRA adapters on HF weights; pass "
                             "an HF model directory or hub ID", setting="base", value=base)
        return ref.hub_id or str(ref.hf_dir)
    rec = man.base if man is not None else manifest_mod.Base()
    if rec.hub_id or rec.hf_dir:
        return rec.hub_id or rec.hf_dir
    guess = named_base(peft_dir)
    if guess:
        return str(guess)
    raise UsageError(f"{peft_dir}: cannot tell which base model this adapter is for; pass "
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
                raise DataError("not an edge-tune run directory (no "
                                "manifest.json); pass the adapter .gguf or export it first",
                                setting="adapter", value=adapter)
            if man.full:  # a full fine-tuning run is a model: chat with it as the base
                return _full_run_target(adapter, man, base, chat_template, system_mode)
            gg = man.adapter.gguf
            if not gg:
                raise DataError("the run has no adapter.gguf yet; run "
                                f"`edge-tune export {adapter}` first (it knows its base)",
                                setting="adapter", value=adapter)
            adapter_gguf = adapter / gg
        elif adapter.is_file():
            adapter_gguf = adapter
            man = manifest_mod.read(adapter.parent)
        else:
            raise UsageError("no such file or directory",
                             setting="adapter", value=adapter)
    if base is not None and (full := _full_run(Path(base))) is not None:
        if adapter is not None:
            raise UsageError("a full fine-tuning run is a whole model of "
                             f"its own, not a base for --adapter {adapter}; use the run "
                             f"alone (--base {base}), or the adapter on its own base "
                             "(drop --base)", setting="base", value=base)
        return _full_run_target(Path(base), full, None, chat_template, system_mode)
    if base is not None:
        ref = models.resolve(base)
        if ref.gguf is None:
            raise UsageError("chat runs on llama.cpp and needs a GGUF base",
                             setting="base", value=base)
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


def tuned_target(run: Path, merged: Optional[Path]) -> tuple[ChatTarget, Path]:
    """What ``eval`` compares with the base: (ChatTarget of the run, tuned GGUF), the run's
    adapter.gguf, or ``merged`` (then the target carries no adapter); a full fine-tuning run's
    own GGUF. Raises UsageError when ``run`` is no run directory or ``merged`` no file."""
    if not run.exists():
        raise UsageError(f"{run}: no such run directory")
    man = manifest_mod.read(run if run.is_dir() else run.parent)
    if man is None:
        raise UsageError(f"{run}: not an edge-tune run directory (no manifest.json); eval reads "
                         "its base, chat template and held-out data from it")
    if merged is None and man.full and man.model is not None and man.model.gguf:
        merged = run / man.model.gguf  # a full fine-tuning run: its model against the base
    if merged is None:
        target = resolve_chat(run, None)
        return target, target.adapter
    if not Path(merged).is_file():
        raise UsageError("no such file", setting="merged", value=merged)
    base = run_base_gguf(man)
    if base is None:
        raise UsageError(f"{run}: the run has no GGUF base to compare the merged model with")
    if not base.exists() and man.base.sha256 == models.DEFAULT_SHA256:
        base = models.default_gguf()  # run copied to another machine: refetch
    mode = man.hyperparameters.system_mode or "keep"
    return ChatTarget(base, None, man, template_choice.choose(None, man), mode), Path(merged)


def _full_run(path: Path) -> Optional[Manifest]:
    """The manifest of a full fine-tuning run directory ``path``, else None."""
    man = manifest_mod.read(path) if path.is_dir() else None
    return man if man is not None and man.full else None


def _full_run_target(run: Path, man: Manifest, base: Optional[str],
                     chat_template: Optional[str], system_mode: Optional[str]) -> ChatTarget:
    """A full fine-tuning run as a chat target: its model GGUF is the base, with no adapter
    (as a merged export); the run's chat template and system mode as for any run."""
    if base is not None:
        raise UsageError(f"{run} is a full fine-tuning run, a whole model of "
                         "its own; drop --base", setting="base", value=base)
    gg = man.model.gguf if man.model is not None else None
    if not gg or not (run / gg).is_file():
        raise DataError("the full run has no model GGUF; run `edge-tune "
                        f"export {run}`", setting="adapter", value=run)
    mode = system_mode_option(system_mode) or man.hyperparameters.system_mode or "keep"
    chosen = template_choice.choose(chat_template, man)
    from edge_tune.templates.vocabulary import require_template_tokens

    require_template_tokens(chosen, models.ModelRef(str(run / gg), gguf=run / gg))
    return ChatTarget(run / gg, None, man, chosen, mode)


# --- the GGUF base of a model given as HF weights: llama.cpp's converter, once, cached ----------

def prequantized(hf_dir: Path) -> bool:
    """Whether the HF model in ``hf_dir`` holds pre-quantized weights (a
    ``quantization_config`` in its config.json: bitsandbytes 4-bit, ...)."""
    try:
        return "quantization_config" in json.loads((Path(hf_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False


def cached_gguf_base(hf_dir: Path, source: Optional[str], fetch: bool,
                     on_event: EventSink = ignore) -> Path:
    """The f16 GGUF of ``hf_dir`` made by llama.cpp's converter, once, in the cache (keyed by
    the weights' content; its sha256 beside it). ``source``: what to name in the message
    (default ``hf_dir``); ``fetch``: the converter may be downloaded. Raises EdgeTuneError
    (one line) when the converter rejects the model."""
    from edge_tune.converters.integrations import hf_to_gguf
    from edge_tune.fsutil import cache_dir, write_text_atomic
    from edge_tune.gguf_config import check_llama_cpp_computes_as_hf

    out = cache_dir() / "gguf" / f"{models.hf_content_key(hf_dir)[:16]}-f16.gguf"
    if not out.is_file():
        check_llama_cpp_computes_as_hf(hf_dir)
        on_event(Log(f"no GGUF base for this model: converting {source or hf_dir} with "
                     f"llama.cpp's converter (once; cached as {out})"))
        hf_to_gguf.convert(hf_dir, out, "f16", on_event, fetch=fetch)
        write_text_atomic(out.with_name(out.name + ".sha256"), sha256_file(out))
    return out


def gguf_base_for(ref: models.ModelRef, on_event: EventSink = ignore) -> Path:
    """A GGUF of the model ``ref`` names: its own file, else the cached conversion of its HF
    weights (:func:`cached_gguf_base`; a pre-quantized ``*-bnb-4bit`` hub model is converted
    from the unquantized repo it maps to)."""
    if ref.gguf is not None:
        return ref.gguf
    source = models.unquantized_hub_id(ref.hub_id or "")  # bnb-4bit: its unquantized repo
    hf_dir = models.hf_dir_for(models.resolve(source, on_event) if source else ref, on_event)
    return cached_gguf_base(hf_dir, source, bool(source or ref.hub_id), on_event)


def converted_base(base: dict, on_event: EventSink = ignore) -> Path:
    """A GGUF base for a model given as HF weights (:func:`cached_gguf_base`), recorded in
    ``base`` (the manifest's record: ``gguf``, ``gguf_source``, ``gguf_from``, ``sha256``). A
    pre-quantized ``unsloth/*-bnb-4bit`` model is converted from the unquantized repo it maps
    to. Raises EdgeTuneError with the converter's reason when llama.cpp cannot run the model."""
    source = base.get("unquantized_hub_id")
    hf_dir = models.hf_dir_for(models.resolve(source, on_event), on_event) if source \
        else Path(base["hf_dir"])
    out = cached_gguf_base(hf_dir, source, bool(source or base.get("hub_id")), on_event)
    digest = out.with_name(out.name + ".sha256")
    base.update(gguf=str(out), gguf_source="converted", gguf_from=source or str(hf_dir),
                sha256=digest.read_text().strip() if digest.is_file() else sha256_file(out))
    return out


def refuse_unless_llama_cpp_runs(ref: models.ModelRef, on_event: EventSink = ignore) -> None:
    """For a local HF model (not a GGUF, a hub model of unquantized weights or pre-quantized
    weights): convert it for llama.cpp now (cached; training's end reuses the file), so a model
    llama.cpp's converter rejects is refused before training, in one line (DataError) naming
    the converter's reason, not after it with an adapter nothing here can run."""
    from edge_tune.errors import DataError

    if ref.gguf is not None or ref.hf_dir is None or \
            models.unquantized_hub_id(ref.hub_id or "") or prequantized(ref.hf_dir):
        return
    try:
        cached_gguf_base(ref.hf_dir, None, bool(ref.hub_id), on_event)
    except EdgeTuneError as exc:
        mismatch = _tokenizer_beyond_vocab(ref.hf_dir)
        if mismatch:
            raise DataError(mismatch) from None
        raise DataError("llama.cpp cannot run this model, so an adapter "
                        f"trained on it could not be chatted with, served or verified here "
                        f"(nothing trained): {exc.message}",
                        setting="model", value=ref.spec) from None


def _tokenizer_beyond_vocab(hf_dir: Path) -> Optional[str]:
    """Why llama.cpp's converter rejected ``hf_dir`` when its tokenizer has more tokens than
    the model's embedding has rows (the converter only asserts), else None."""
    try:
        config = json.loads((hf_dir / "config.json").read_text())
        from transformers import AutoTokenizer

        size = len(AutoTokenizer.from_pretrained(str(hf_dir)))
    except Exception:  # noqa: BLE001 - no better reason than the converter's own
        return None
    vocab = (config.get("text_config") or config).get("vocab_size")
    if not isinstance(vocab, int) or size <= vocab:
        return None
    return (f"{hf_dir / 'config.json'}: vocab_size: {vocab} is smaller than the tokenizer, "
            f"which has {size} tokens (expected a tokenizer that matches the model's "
            "embedding: llama.cpp's converter refuses this model, and a token id past "
            "vocab_size would stop training)")


@dataclass
class TrainingBase:
    """The base a run trains on: ``ref`` (``--model`` resolved) and ``sha256``, its GGUF's
    digest (None for HF weights), hashed once for the worker and the manifest."""
    ref: models.ModelRef
    sha256: Optional[str]


def training_base(model: str, chosen: Optional[template_choice.ChatTemplate], records: list,
                  on_event: EventSink = ignore) -> TrainingBase:
    """The base a run trains on: ``--model`` resolved (a download says so), its chat template
    settled for conversational ``records`` (job records; ``chosen``: ``--chat-template``),
    refused before training when llama.cpp cannot run it
    (:func:`refuse_unless_llama_cpp_runs`)."""
    ref = models.resolve(model, on_event)
    template_choice.require_for_conversations(records, ref, chosen)
    refuse_unless_llama_cpp_runs(ref, on_event)  # before the training time is spent
    return TrainingBase(ref, sha256_file(ref.gguf) if ref.gguf else None)
