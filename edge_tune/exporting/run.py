"""A trained run completed: its GGUF (the adapter, or a full run's model) and manifest written
(:func:`package`), then llama.cpp checked against the training framework (:func:`check`).
``train`` runs both after training; :func:`finish_run` runs them from what a run whose last
steps failed (disk full, killed) saved, without its data or training again."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from edge_tune import manifest as manifest_mod
from edge_tune import models
from edge_tune.adapters import conversion_base, converted_base, peft_adapter, prequantized
from edge_tune.training.job import WorkerResult
from edge_tune.config import TrainConfig
from edge_tune.errors import CheckFailed, DataError, EdgeTuneError
from edge_tune.events import Done, EventSink, Log, ignore
from edge_tune.exporting.checked import reject
from edge_tune.exporting.steps import export_adapter, export_full
from edge_tune.fsutil import disk_full_says, remove_tree, sha256_file
from edge_tune.runs import (FULL_MODEL_GGUF, load_run_config, say_leftovers, trained_dir,
                            training_finished)
from edge_tune.templates import choice as template_choice
from edge_tune.verify import verify_hook


@dataclass
class TrainResult:
    """A finished run: its directory and its manifest (as written to manifest.json)."""
    run_dir: Path
    manifest: manifest_mod.Manifest


@dataclass
class Trained:
    """What training left and what completing the run needs: the run directory, its settings
    (``cfg``, as planned), the worker's result, the base (``ref``; ``base_sha256``: its GGUF's
    digest, None for HF weights), ``chosen`` (``--chat-template``, or None), the backend and
    why it was chosen, and ``finish`` (RUN_CONFIG's record: the manifest's data and plan)."""
    run_dir: Path
    cfg: TrainConfig
    result: WorkerResult
    ref: models.ModelRef
    chosen: Optional[template_choice.ChatTemplate]
    base_sha256: Optional[str]
    backend: str
    why: str
    finish: dict


@dataclass
class Packaged:
    """A run's outputs written: the manifest, the base's manifest record and GGUF (None when
    llama.cpp cannot run the model: ``not_runnable`` says why, in its converter's words)."""
    trained: Trained
    manifest: manifest_mod.Manifest
    base: dict
    base_gguf: Optional[Path]
    not_runnable: Optional[str]


@contextlib.contextmanager
def completing(trained: Trained) -> Iterator[None]:
    """Around :func:`package` and :func:`check`: the trained adapter (model) is already saved
    with its result, so the checkpoint goes first (3x the adapter's size), and a disk that
    fills up is DiskFull naming what was kept and the command that finishes the run."""
    from edge_tune.training.checkpoint import CHECKPOINT

    run_dir, full = trained.run_dir, trained.cfg.full
    remove_tree(run_dir / CHECKPOINT)  # finished: the adapter is the result

    def kept() -> str:
        if (run_dir / manifest_mod.MANIFEST).is_file():  # only verify was left
            return (f"the run is complete ({run_dir / manifest_mod.MANIFEST}); free space, then "
                    f"`edge-tune verify {run_dir}` checks it")
        return (f"kept: the trained {'model' if full else 'adapter'} in "
                f"{trained_dir(run_dir, full)}: free space, then `edge-tune train --resume "
                f"{run_dir}` (or `edge-tune export {run_dir}`) finishes the run without "
                "training again")

    with disk_full_says(run_dir, kept):
        yield


def package(t: Trained, on_event: EventSink = ignore) -> Packaged:
    """The run's GGUF and manifest: a LoRA run's ``adapter.gguf`` converted against the base's
    GGUF (HF weights: its cached conversion; DoRA: none, it has no GGUF LoRA form), a full
    run's ``model.gguf`` (F16, checked by :func:`check`), then ``manifest.json``."""
    run_dir, cfg, result = t.run_dir, t.cfg, t.result
    base = _base_record(t.ref, result.hf_dir, t.base_sha256)
    adapter_info: dict = {} if cfg.full else {"peft": "adapter"}
    if result.mlx_adapter:
        adapter_info["mlx"] = result.mlx_adapter  # the native mlx-lm adapter dir
    not_runnable = None  # why llama.cpp cannot run this model (its converter's reason)
    try:
        base_gguf = t.ref.gguf or converted_base(base, on_event)  # HF weights: cached convert
    except EdgeTuneError as exc:
        base_gguf, not_runnable = None, exc.message
    model_info = None
    if cfg.full:  # the trained weights, converted by llama.cpp's converter (verified later)
        shipped = export_full(run_dir, manifest_mod.Manifest(kind="full"),
                              run_dir / FULL_MODEL_GGUF, "F16", on_event, vocab_from=t.ref.gguf,
                              verify=False, checked_later=True)
        model_info = {"hf": "model", "gguf": FULL_MODEL_GGUF, "quant": shipped.quant}
    elif base_gguf is not None and not cfg.dora:
        peft_dir, _ = peft_adapter(run_dir / "adapter")
        info, _ = conversion_base(peft_dir, None, base_gguf)
        exported = export_adapter(run_dir / "adapter", peft_dir, None, info, base_gguf,
                                  run_dir / "adapter.gguf", on_event=on_event,
                                  base_sha256=base["sha256"], verify=False)
        adapter_info.update(gguf="adapter.gguf", alpha=exported.alpha, rank=exported.rank)
    # the manifest's result: training's figures (the rest went to the sections above)
    figures = {k: v for k, v in result.to_dict().items()
               if k not in ("tokenizer", "hf_dir", "mlx_adapter")}
    figures["checkpoints"] = _kept_checkpoints(run_dir, on_event)
    man = manifest_mod.build(
        config=cfg.to_dict(), backend=t.backend, backend_reason=t.why, base=base,
        data={**(t.finish.get("data") or {}), "examples": result.examples},
        result=figures, tokenizer=_template_record(result.tokenizer, t.chosen),
        adapter=adapter_info, plan=t.finish.get("plan"), kind="full" if cfg.full else "lora",
        model=model_info)
    manifest_mod.write(run_dir, man)
    return Packaged(t, man, base, base_gguf, not_runnable)


def check(p: Packaged, on_event: EventSink = ignore) -> TrainResult:
    """llama.cpp against the training framework on the run's held-back prompts (``cfg.verify``;
    a full run's model that fails is moved aside, see :func:`_check_full_model`), out of
    tolerance CheckFailed (exit 1); CheckFailed too when llama.cpp cannot run the model at
    all. Ends with the ``train`` Done event."""
    run_dir, cfg, base_gguf = p.trained.run_dir, p.trained.cfg, p.base_gguf
    if cfg.full:
        if cfg.verify and base_gguf is not None:
            # converts to F32 again (the exact check needs it; seconds for small models)
            _check_full_model(run_dir, on_event)
    elif cfg.dora and base_gguf is not None:
        on_event(Log(f"DoRA: no adapter.gguf; `edge-tune export {run_dir} --merge` writes the "
                     "merged GGUF and verifies it", "warning"))
    elif cfg.verify and base_gguf is not None:
        if prequantized(Path(p.base["hf_dir"])):  # verify's torch side cannot load bnb weights
            on_event(Log("verify: skipped (trained on pre-quantized 4-bit weights); run "
                         f"`edge-tune verify {run_dir} --base {base_gguf}`", "warning"))
        else:
            verify_hook(run_dir, None, on_event)  # llama.cpp runs what was trained, or exit 1
    if p.not_runnable is not None:  # the run's result cannot be used where edge-tune runs it
        trained = trained_dir(run_dir, cfg.full)
        raise CheckFailed(f"{run_dir}: trained ({'weights' if cfg.full else 'PEFT adapter'} in "
                          f"{trained}), but llama.cpp cannot run this model, so there is no "
                          f"GGUF to chat with: {p.not_runnable}")
    on_event(Done("train", {"run_dir": str(run_dir)}))
    return TrainResult(run_dir, p.manifest)


def finish_run(run_dir: Path, on_event: EventSink = ignore, verify: bool = True
               ) -> TrainResult:
    """Complete a run whose training finished (:func:`edge_tune.runs.training_finished`) from
    what it saved: the GGUF export, the manifest and (``verify``) the check. Needs neither the
    data nor training again. Raises EdgeTuneError when the run has no finished training."""
    from edge_tune.training.worker import TRAINING_RESULT

    run_dir = Path(run_dir)
    if not training_finished(run_dir):
        raise DataError(f"{run_dir}: no finished training to complete")
    cfg, saved = load_run_config(run_dir, check_data=False)
    if not verify:
        cfg = dataclasses.replace(cfg, verify=False)
    say_leftovers(run_dir, on_event)
    saved_result = trained_dir(run_dir, cfg.full) / TRAINING_RESULT
    result = json.loads(saved_result.read_text())
    backend = result.pop("backend", None) or cfg.backend
    result = WorkerResult.from_dict(result, str(saved_result))
    finish = saved.get("finish") or {}
    on_event(Log(f"{run_dir}: training had finished ({result.steps} steps); writing "
                 "what is missing (GGUF, manifest)"))
    ref = models.resolve(cfg.model, on_event)
    base_sha256 = sha256_file(ref.gguf) if ref.gguf else None
    trained = Trained(run_dir, cfg, result, ref, template_choice.given(cfg.chat_template),
                      base_sha256, backend, finish.get("backend_reason", ""), finish)
    with completing(trained):
        return check(package(trained, on_event), on_event)


def _template_record(tokenizer_info: dict, chosen) -> dict:
    """The manifest's template fields: the text the data was rendered with, its built-in
    name, where it came from, and the stop tokens (the template's end of turn included)."""
    from edge_tune.templates.builtin import EOS, template_name

    info = dict(tokenizer_info)
    name = template_name(info.get("chat_template") or "")
    info.update(chat_template_name=name,
                chat_template_source="--chat-template" if chosen else "model")
    if name and EOS[name] not in info.get("stop_tokens", []):
        info["stop_tokens"] = [*info.get("stop_tokens", []), EOS[name]]
    return info


def _base_record(ref: models.ModelRef, hf_dir: str, sha256: Optional[str]) -> dict:
    """The manifest's ``base``: the model as given, its GGUF, digest and architecture (HF
    weights: no GGUF yet, :func:`edge_tune.adapters.converted_base` fills it in)."""
    rec: dict = {"spec": ref.spec, "hf_dir": hf_dir}
    if ref.gguf is not None:
        from edge_tune.converters.formats.base_info import from_gguf

        info = from_gguf(ref.gguf)
        rec.update(gguf=str(ref.gguf), sha256=sha256, arch=info.arch,
                   name=info.metadata.get("name", ""), gguf_source="given")
        if ref.ollama:  # read from Ollama's store: a Modelfile can name it (FROM NAME)
            rec["ollama"] = ref.ollama
    else:
        from edge_tune.converters.formats.base_info import from_hf_dir

        rec.update(gguf=None, sha256=None, arch=from_hf_dir(Path(hf_dir)).arch,
                   hub_id=ref.hub_id)
        if ref.hub_id and models.unquantized_hub_id(ref.hub_id):
            rec["unquantized_hub_id"] = models.unquantized_hub_id(ref.hub_id)
    return rec


def _check_full_model(run_dir: Path, on_event: EventSink) -> None:
    """verify a full run's model GGUF; one that fails does not keep its name (it moves to
    ``model.rejected.gguf``, the reason beside it), as every exported model."""
    model = run_dir / FULL_MODEL_GGUF
    report = verify_hook(run_dir, None, on_event, merged=model, raise_on_fail=False)
    if not report.ok:
        reason = f"{report.summary}: out of tolerance: {'; '.join(report.failures)}"
        raise CheckFailed(f"{model.name}: {reason}; {reject(model, model, reason)}")


def _kept_checkpoints(run_dir: Path, on_event: EventSink) -> Optional[list]:
    """The run's kept ``checkpoint-STEP`` folders (``--save-total-limit``) for the manifest,
    said in one line with the best by validation loss; None when it kept none."""
    from edge_tune.training.checkpoint import kept

    rows = kept(run_dir)
    if not rows:
        return None
    best = next((r for r in rows if r["best"]), None)
    on_event(Log(f"kept checkpoints: {', '.join(r['path'] for r in rows)}"
                 + (f"; best by validation loss: {run_dir / best['path']} (val loss "
                    f"{best['val_loss']:.4f})" if best else "")))
    return rows
