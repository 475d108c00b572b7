"""The headless core: every front end (CLI, TUI, scripts) calls these functions.

Each takes an ``on_event`` sink for progress/metrics/logs (see :mod:`edge_tune.events`) and
returns plain data. Heavy libraries are imported inside the functions that need them.
"""

from __future__ import annotations

import datetime as _dt
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from edge_tune import manifest as manifest_mod
from edge_tune import models
from edge_tune.backends import registry
from edge_tune.config import TrainConfig
from edge_tune.data.formats import read_records
from edge_tune.errors import EdgeTuneError
from edge_tune.events import Done, EventSink, Log, ignore
from edge_tune.fsutil import sha256_file
from edge_tune.hardware import probe

# --- doctor ----------------------------------------------------------------------------------


def doctor() -> dict:
    """Hardware facts, every backend's availability (with the reason for each "no"), and
    what ``--backend auto`` picks."""
    from edge_tune.fsutil import cache_dir

    hw = probe(cache_dir())
    table = registry.availability(hw)
    try:
        pick, why = registry.choose("auto", hw)
    except EdgeTuneError as exc:
        pick, why = None, str(exc)
    return {
        "hardware": hw.to_dict(),
        "backends": [vars(a) for a in table],
        "auto": {"backend": pick, "reason": why},
        "cpu_bf16": hw.has_bf16_cpu,
    }


# --- train -----------------------------------------------------------------------------------


def _read_data(path: str, cfg: TrainConfig, on_event: EventSink):
    result = read_records(path, fmt=cfg.format, skip_invalid=cfg.skip_invalid)
    if result.skipped:
        lines = ", ".join(str(n) for n, _ in result.skipped[:20])
        more = " ..." if len(result.skipped) > 20 else ""
        on_event(Log(f"{path}: skipped {len(result.skipped)} invalid records (lines {lines}{more});"
                     f" first: {result.skipped[0][1]}", "warning"))
    on_event(Log(f"{path}: {len(result.records)} records, format {result.format}"))
    return result


def _job_record(record) -> dict:
    return {"text": record.text} if record.messages is None else {"messages": record.messages}


def split_validation(records: list, share: float, seed: int,
                     val: Optional[list] = None) -> tuple[list, list]:
    """(train, validation) records: a given validation set, or a seeded random share. Pure."""
    import random

    if val is not None or not share:
        return records, val or []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(records) * share))
    if n_val >= len(records):
        raise EdgeTuneError(f"--val-split {share}: leaves no training records out of "
                            f"{len(records)}")
    held = set(order[:n_val])
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


@dataclass
class TrainResult:
    run_dir: Path
    manifest: dict


def default_run_dir() -> Path:
    return Path("runs") / _dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")


def _prepare_run_dir(out: Optional[str]) -> Path:
    run_dir = Path(out) if out else default_run_dir()
    if run_dir.exists() and not run_dir.is_dir():
        raise EdgeTuneError(f"--out {run_dir}: exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()) and \
            not (run_dir / manifest_mod.MANIFEST).exists():
        raise EdgeTuneError(f"--out {run_dir}: directory is not empty and is not an edge-tune "
                            "run; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train(cfg: TrainConfig, on_event: EventSink = ignore,
          cancel: Optional[threading.Event] = None) -> TrainResult:
    """Train a LoRA adapter in a subprocess, export it to GGUF, write the manifest."""
    from edge_tune.runner import TrainingProcess

    data_path = Path(cfg.data)
    models.check_spec(cfg.model)  # bad input fails fast, before any download or heavy work
    data = _read_data(cfg.data, cfg, on_event)
    records = data.records
    train_records, val_records = split_validation(
        [_job_record(r) for r in records], cfg.val_split, cfg.seed,
        [_job_record(r) for r in _read_data(cfg.val, cfg, on_event).records] if cfg.val else None)
    ref = models.resolve(cfg.model, on_event)
    base_sha256 = sha256_file(ref.gguf) if ref.gguf else None  # once: worker and manifest
    hw = probe()
    backend, why = registry.choose(cfg.backend, hw)
    on_event(Log(f"backend: {backend} ({why})"))
    run_dir = _prepare_run_dir(cfg.out)
    job = {
        "config": cfg.to_dict(),
        "backend": backend,
        "model_ref": {"spec": ref.spec, "gguf": str(ref.gguf) if ref.gguf else None,
                      "hf_dir": str(ref.hf_dir) if ref.hf_dir else None, "hub_id": ref.hub_id},
        "base_sha256": base_sha256,
        "records": train_records,
        "val_records": val_records,
        "run_dir": str(run_dir),
        "physical_cores": hw.physical_cores,
        "cpu_has_bf16": hw.has_bf16_cpu,
    }
    proc = TrainingProcess(job, run_dir, on_event)
    if cancel is not None:
        def watch() -> None:
            while not cancel.wait(0.2):
                if proc.proc.poll() is not None:
                    return
            proc.cancel()

        threading.Thread(target=watch, daemon=True).start()
    result = proc.wait()
    tokenizer_info = result.pop("tokenizer", {})
    base = _base_record(ref, result.pop("hf_dir"), base_sha256)
    adapter_info: dict = {"peft": "adapter"}
    if ref.gguf is not None:
        plan = export(run_dir / "adapter", base=ref.gguf, out=run_dir / "adapter.gguf",
                      on_event=on_event, _base_sha256=base["sha256"])
        adapter_info.update(gguf="adapter.gguf", alpha=plan.alpha, rank=plan.rank)
    else:
        on_event(Log("no GGUF base for this model: run `edge-tune export RUN --base BASE.gguf` "
                     "to get adapter.gguf", "warning"))
    man = manifest_mod.build(
        config=cfg.to_dict(), backend=backend, backend_reason=why, base=base,
        data={"path": str(data_path.resolve()), "format": data.format,
              "sha256": sha256_file(data_path) if data_path.is_file() else None,
              "skipped": len(data.skipped),
              "records": len(records), "examples": result.get("examples"),
              "val": str(Path(cfg.val).resolve()) if cfg.val else None,
              "val_records": len(val_records)},
        result=result, tokenizer=tokenizer_info, adapter=adapter_info)
    manifest_mod.write(run_dir, man)
    on_event(Done("train", {"run_dir": str(run_dir)}))
    return TrainResult(run_dir, man)


def _base_record(ref: models.ModelRef, hf_dir: str, sha256: Optional[str]) -> dict:
    rec: dict = {"spec": ref.spec, "hf_dir": hf_dir}
    if ref.gguf is not None:
        from edge_tune.converters.base_info import from_gguf

        info = from_gguf(ref.gguf)
        rec.update(gguf=str(ref.gguf), sha256=sha256, arch=info.arch,
                   name=info.metadata.get("name", ""))
    else:
        from edge_tune.converters.base_info import from_hf_dir

        rec.update(gguf=None, sha256=None, arch=from_hf_dir(Path(hf_dir)).arch,
                   hub_id=ref.hub_id)
    return rec


# --- export ----------------------------------------------------------------------------------


def _adapter_dirs(adapter: Path) -> tuple[Path, Optional[dict]]:
    """(PEFT adapter dir, run manifest or None) for a run directory or a PEFT directory."""
    adapter = Path(adapter)
    if not adapter.exists():
        raise EdgeTuneError(f"{adapter}: no such adapter directory")
    man = manifest_mod.read(adapter) if adapter.is_dir() else None
    if man is not None:
        return adapter / man.get("adapter", {}).get("peft", "adapter"), man
    if (adapter / "adapter_config.json").is_file():
        return adapter, None
    raise EdgeTuneError(f"{adapter}: neither an edge-tune run directory (manifest.json) nor a "
                        "PEFT adapter directory (adapter_config.json)")


def _base_info_for_export(peft_dir: Path, man: Optional[dict], base: Optional[Path]):
    from edge_tune.converters import base_info

    if base is not None:
        ref = models.resolve(str(base))
        if ref.gguf is not None:
            return base_info.from_gguf(ref.gguf), ref.gguf
        if ref.hf_dir is not None:
            return base_info.from_hf_dir(ref.hf_dir), None
        raise EdgeTuneError(f"--base {base}: expected a GGUF file or an HF model directory")
    if man is not None and man.get("base", {}).get("gguf"):
        path = Path(man["base"]["gguf"])
        return base_info.from_gguf(path), path
    try:
        cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        cfg = {}
    guess = Path(str(cfg.get("base_model_name_or_path") or ""))
    if str(guess) and (guess / "config.json").is_file():
        return base_info.from_hf_dir(guess), None
    raise EdgeTuneError(f"{peft_dir}: cannot tell which base model this adapter is for; "
                        "pass --base BASE.gguf")


def export(adapter: Path, base: Optional[Path] = None, out: Optional[Path] = None,
           outtype: str = "f32", on_event: EventSink = ignore, _base_sha256: Optional[str] = None):
    """Convert a PEFT adapter (or a run's adapter) to a GGUF LoRA adapter."""
    from edge_tune.converters import peft_to_gguf

    peft_dir, man = _adapter_dirs(Path(adapter))
    info, base_gguf = _base_info_for_export(peft_dir, man, base)
    if out is None:
        out = (Path(adapter) / "adapter.gguf") if man is not None else \
            peft_dir.with_name(peft_dir.name + ".gguf")
    meta = {"general.name": f"edge-tune LoRA ({peft_dir.name})"}
    if base_gguf is not None:
        meta["edge_tune.base_sha256"] = _base_sha256 or sha256_file(base_gguf)
        meta["edge_tune.base_name"] = Path(base_gguf).name
    plan = peft_to_gguf.convert(peft_dir, info, Path(out), outtype, meta)
    on_event(Log(f"wrote {out} ({len(plan.tensors) // 2} LoRA pairs, rank {plan.rank}, "
                 f"alpha {plan.alpha:g}, {outtype})"))
    on_event(Done("export", {"path": str(out)}))
    return plan


# --- chat ------------------------------------------------------------------------------------


@dataclass
class ChatTarget:
    base: Path
    adapter: Optional[Path]
    manifest: Optional[dict]


def resolve_chat(adapter: Optional[Path], base: Optional[str]) -> ChatTarget:
    """Work out base GGUF + adapter GGUF from a run dir / adapter file / --base."""
    man = None
    adapter_gguf = None
    if adapter is not None:
        adapter = Path(adapter)
        if adapter.is_dir():
            man = manifest_mod.read(adapter)
            if man is None:
                raise EdgeTuneError(f"--adapter {adapter}: not an edge-tune run directory (no "
                                    "manifest.json); pass the adapter .gguf or export it first")
            gg = man.get("adapter", {}).get("gguf")
            if not gg:
                raise EdgeTuneError(f"--adapter {adapter}: the run has no adapter.gguf; run "
                                    f"`edge-tune export {adapter} --base BASE.gguf`")
            adapter_gguf = adapter / gg
        elif adapter.is_file():
            adapter_gguf = adapter
            man = manifest_mod.read(adapter.parent)
        else:
            raise EdgeTuneError(f"--adapter {adapter}: no such file or directory")
    if base is not None:
        ref = models.resolve(base)
        if ref.gguf is None:
            raise EdgeTuneError(f"--base {base}: chat runs on llama.cpp and needs a GGUF base")
        base_path = ref.gguf
    elif man is not None and man.get("base", {}).get("gguf"):
        base_path = Path(man["base"]["gguf"])
        if not base_path.exists() and man["base"].get("sha256") == models.DEFAULT_SHA256:
            base_path = models.default_gguf()  # run copied to another machine: refetch
    else:
        base_path = models.default_gguf()
    return ChatTarget(base_path, adapter_gguf, man)


def open_engine(target: ChatTarget, on_event: EventSink = ignore, **engine_kw):
    """Load the base in llama.cpp and activate the (validated) adapter, if any."""
    from edge_tune.engine import Engine

    engine = Engine(target.base, **engine_kw)
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


def chat_once(target: ChatTarget, prompt: str, system: Optional[str] = None,
              temperature: float = 0.7, max_tokens: int = 256) -> Iterator[str]:
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": prompt}]
    engine = open_engine(target)
    try:
        yield from engine.chat_stream(messages, temperature=temperature, max_tokens=max_tokens)
    finally:
        engine.close()
