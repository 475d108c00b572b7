"""The headless core: every front end (CLI, TUI, scripts) calls these functions.

Each takes an ``on_event`` sink for progress/metrics/logs (see :mod:`edge_tune.events`) and
returns plain data. Heavy libraries are imported inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from edge_tune import manifest as manifest_mod
from edge_tune import models, template_choice
from edge_tune.backends import registry
from edge_tune.config import TrainConfig
from edge_tune.errors import CheckFailed, EdgeTuneError
from edge_tune.events import Done, EventSink, Log, Progress, ignore
from edge_tune.fsutil import sha256_file, write_text_atomic
from edge_tune.hardware import probe
# Re-exported here, their home is elsewhere: callers of edge_tune.api keep working.
from edge_tune.data.split import split_validation
from edge_tune.server.plan import ServePlan
from edge_tune.template_choice import system_mode_option as _system_mode
from edge_tune.commands.convert import \
    check_llama_cpp_computes_as_hf as _check_llama_cpp_computes_as_hf
from edge_tune.commands.convert import convert_base, fetch_converter
from edge_tune.commands.doctor import doctor
from edge_tune.commands.inspect import bad_records, inspect_data, model_template
from edge_tune.commands import plan as _plan_command
from edge_tune.commands.plan import PLANNED, model_shape, planner_describe
from edge_tune.commands.plan import check_plan as _check_plan
from edge_tune.commands.plan import fit_plan as _plan
from edge_tune.commands.plan import job_record as _job_record
from edge_tune.commands.plan import read_data as _read_data
from edge_tune.runs import RUN_CONFIG, default_run_dir, delete_run, list_runs, load_run_config
from edge_tune.runs import prepare_run_dir as _prepare_run_dir
from edge_tune.runs import resume_state

plan = _plan_command.plan  # an assignment: the command's own locals named plan stay legal

__all__ = [
    # commands
    "doctor", "plan", "train", "inspect_data", "model_template", "bad_records", "export",
    "convert_base", "fetch_converter", "verify", "resolve_chat", "open_engine", "chat_once",
    "chat_plan", "plan_serving", "open_serving", "serve", "bundle",
    # runs on disk
    "RUN_CONFIG", "default_run_dir", "load_run_config", "resume_state", "list_runs",
    "delete_run",
    # data shapes and helpers front ends, tests and benchmarks use
    "TrainResult", "ChatTarget", "ServePlan", "PLANNED", "planner_describe", "model_shape",
    "split_validation", "probe", "manifest_mod", "_job_record", "_converted_base",
]

# --- train -----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    manifest: dict


def train(cfg: Optional[TrainConfig], on_event: EventSink = ignore,
          cancel: Optional[threading.Event] = None,
          resume: Optional[Path] = None) -> TrainResult:
    """Train a LoRA adapter in a subprocess, export it to GGUF, write the manifest.

    ``resume``: a run directory whose training was cancelled; its saved config is used
    (``cfg`` must be None) and training continues from its checkpoint to the same total
    steps."""
    from edge_tune.backends.checkpoint import CHECKPOINT
    from edge_tune.backends.job import TrainJob
    from edge_tune.runner import TrainingProcess

    saved = None
    if resume is not None:
        if cfg is not None:
            raise EdgeTuneError("--resume continues a run with its own settings; give no other "
                                "training options")
        if resume_state(resume) is None:
            raise EdgeTuneError(f"--resume {resume}: nothing to resume (the run finished or "
                                f"has no {RUN_CONFIG})")
        cfg, saved = load_run_config(resume)
    assert cfg is not None
    data_path = Path(cfg.data)
    models.check_spec(cfg.model)  # bad input fails fast, before any download or heavy work
    chosen = template_choice.given(cfg.chat_template)
    hw = probe()
    backend, why = registry.choose(cfg.backend, hw)  # an unusable backend: one line, first
    if resume is not None and not registry.capabilities(backend).resumable:
        raise EdgeTuneError(f"--resume {resume}: resuming is supported for the "
                            f"{' and '.join(registry.having('resumable'))} "
                            f"backends; this run uses {backend}: start it again")
    if (cfg.nproc > 1 or cfg.nnodes > 1) and not registry.capabilities(backend).multi_process:
        raise EdgeTuneError(f"--nproc/--nnodes: multi-process training runs on the cpu (gloo) "
                            f"and unsloth (NCCL) backends, not {backend}")
    if registry.capabilities(backend).device == "cuda" and cfg.nproc > len(hw.cuda_gpus):
        raise EdgeTuneError(f"--nproc {cfg.nproc}: the {backend} backend runs one process per GPU "
                            f"and this node has {len(hw.cuda_gpus)}")
    data_sha256 = sha256_file(data_path) if data_path.is_file() else None
    if saved is not None and saved.get("data_sha256") != data_sha256:
        raise EdgeTuneError(f"--resume {resume}: {cfg.data} changed since the run started; "
                            "start a new run instead")
    data = _read_data(cfg.data, cfg, on_event)
    records = data.records
    train_records, val_records = split_validation(
        [_job_record(r) for r in records], cfg.val_split, cfg.seed,
        [_job_record(r) for r in _read_data(cfg.val, cfg, on_event).records] if cfg.val else None)
    ref = models.resolve(cfg.model, on_event)
    template_choice.require_for_conversations(train_records + val_records, ref, chosen)
    base_sha256 = sha256_file(ref.gguf) if ref.gguf else None  # once: worker and manifest
    on_event(Log(f"backend: {backend} ({why})"))
    run_plan = None
    if resume is None:  # a resumed run keeps the settings it was planned with
        run_plan = _plan(cfg, ref, backend, hw, train_records)
        if run_plan is not None:
            _check_plan(run_plan)
            on_event(Log(planner_describe(run_plan)))
            cfg = dataclasses.replace(cfg, **{k: run_plan.config[k] for k in PLANNED})
    if resume is None:
        existed = Path(cfg.out).exists() if cfg.out else False
        run_dir = _prepare_run_dir(cfg.out)
        shutil.rmtree(run_dir / CHECKPOINT, ignore_errors=True)  # a stale one from a reused dir
        write_text_atomic(run_dir / RUN_CONFIG, json.dumps(
            {"config": cfg.to_dict(), "data_sha256": data_sha256}, indent=2) + "\n")
    else:
        run_dir = Path(resume)
    ckpt = run_dir / CHECKPOINT
    job = TrainJob.from_dict({  # the wire contract: a key it does not have is an error
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
        "resume_from": str(ckpt) if resume is not None and ckpt.is_dir() else None,
        "chat_template": chosen.text if chosen else None,  # replaces the tokenizer's own
    })
    proc = TrainingProcess(job, run_dir, on_event)
    if cancel is not None:
        def watch() -> None:
            while not cancel.wait(0.2):
                if proc.proc.poll() is not None:
                    return
            proc.cancel()

        threading.Thread(target=watch, daemon=True).start()
    try:
        result = proc.wait()
    except EdgeTuneError as exc:
        from edge_tune.errors import ExitCode

        # The worker refused its input (data, tokenizer, model) before training: the run
        # never started, so the folder made for it goes (a crash keeps it: the message names
        # train.log; a reused --out folder stays).
        if resume is None and not existed and exc.exit_code == ExitCode.BAD_INPUT:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    tokenizer_info = _template_record(result.pop("tokenizer", {}), chosen)
    base = _base_record(ref, result.pop("hf_dir"), base_sha256)
    adapter_info: dict = {"peft": "adapter"}
    if result.get("mlx_adapter"):
        adapter_info["mlx"] = result.pop("mlx_adapter")  # the native mlx-lm adapter dir
    base_gguf = ref.gguf or _converted_base(base, on_event)  # HF weights: convert-base, cached
    if base_gguf is not None:
        plan = export(run_dir / "adapter", base=base_gguf, out=run_dir / "adapter.gguf",
                      on_event=on_event, _base_sha256=base["sha256"])
        adapter_info.update(gguf="adapter.gguf", alpha=plan.alpha, rank=plan.rank)
    man = manifest_mod.build(
        config=cfg.to_dict(), backend=backend, backend_reason=why, base=base,
        data={"path": str(data_path.resolve()), "format": data.format,
              "sha256": data_sha256,
              "skipped": len(data.skipped),
              "records": len(records), "examples": result.get("examples"),
              "val": str(Path(cfg.val).resolve()) if cfg.val else None,
              "val_records": len(val_records)},
        result=result, tokenizer=tokenizer_info, adapter=adapter_info,
        plan=run_plan.to_dict() if run_plan is not None else None)
    manifest_mod.write(run_dir, man)
    shutil.rmtree(ckpt, ignore_errors=True)  # finished: the adapter is the result
    if getattr(cfg, "verify", True) and base_gguf is not None:
        if _prequantized(Path(base["hf_dir"])):  # verify's torch side cannot load bnb weights
            on_event(Log("verify: skipped (trained on pre-quantized 4-bit weights); run "
                         f"`edge-tune verify {run_dir} --base {base_gguf}`", "warning"))
        else:
            _verify_hook(run_dir, None, on_event)  # llama.cpp runs what was trained, or exit 1
    on_event(Done("train", {"run_dir": str(run_dir)}))
    return TrainResult(run_dir, man)


def _template_record(tokenizer_info: dict, chosen) -> dict:
    """The manifest's template fields: the text the data was rendered with, its built-in
    name, where it came from, and the stop tokens (the template's end of turn included)."""
    from edge_tune.templates import EOS, template_name

    info = dict(tokenizer_info)
    name = template_name(info.get("chat_template") or "")
    info.update(chat_template_name=name,
                chat_template_source="--chat-template" if chosen else "model")
    if name and EOS[name] not in info.get("stop_tokens", []):
        info["stop_tokens"] = [*info.get("stop_tokens", []), EOS[name]]
    return info


def _base_record(ref: models.ModelRef, hf_dir: str, sha256: Optional[str]) -> dict:
    rec: dict = {"spec": ref.spec, "hf_dir": hf_dir}
    if ref.gguf is not None:
        from edge_tune.converters.base_info import from_gguf

        info = from_gguf(ref.gguf)
        rec.update(gguf=str(ref.gguf), sha256=sha256, arch=info.arch,
                   name=info.metadata.get("name", ""), gguf_source="given")
        if ref.ollama:  # read from Ollama's store: a Modelfile can name it (FROM NAME)
            rec["ollama"] = ref.ollama
    else:
        from edge_tune.converters.base_info import from_hf_dir

        rec.update(gguf=None, sha256=None, arch=from_hf_dir(Path(hf_dir)).arch,
                   hub_id=ref.hub_id)
        if ref.hub_id and models.unquantized_hub_id(ref.hub_id):
            rec["unquantized_hub_id"] = models.unquantized_hub_id(ref.hub_id)
    return rec


def _prequantized(hf_dir: Path) -> bool:
    try:
        return "quantization_config" in json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _converted_base(base: dict, on_event: EventSink) -> Optional[Path]:
    """A GGUF base for a model given as HF weights: made once with convert-base's converter
    (f16) into the cache, keyed by the weights' content, and recorded in ``base`` (the
    manifest's record). A pre-quantized ``unsloth/*-bnb-4bit`` model is converted from the
    unquantized repo it maps to. None, with a warning, when conversion fails: the adapter
    stays, and ``edge-tune export RUN --base BASE.gguf`` still works."""
    from edge_tune.converters import hf_to_gguf
    from edge_tune.fsutil import cache_dir

    source = base.get("unquantized_hub_id")
    try:
        hf_dir = models.hf_dir_for(models.resolve(source, on_event), on_event) if source \
            else Path(base["hf_dir"])
        out = cache_dir() / "gguf" / f"{models.hf_content_key(hf_dir)[:16]}-f16.gguf"
        if not out.is_file():
            _check_llama_cpp_computes_as_hf(hf_dir)
            on_event(Log(f"no GGUF base for this model: converting {source or hf_dir} with "
                         f"llama.cpp's converter (once; cached as {out})"))
            hf_to_gguf.convert(hf_dir, out, "f16", on_event,
                               fetch=bool(source or base.get("hub_id")))
            write_text_atomic(out.with_name(out.name + ".sha256"), sha256_file(out))
    except EdgeTuneError as exc:
        on_event(Log(f"no GGUF base for this model ({exc}); run `edge-tune convert-base`, then "
                     "`edge-tune export RUN --base BASE.gguf` to get adapter.gguf", "warning"))
        return None
    digest = out.with_name(out.name + ".sha256")
    base.update(gguf=str(out), gguf_source="converted", gguf_from=source or str(hf_dir),
                sha256=digest.read_text().strip() if digest.is_file() else sha256_file(out))
    return out


# --- data inspection and runs on disk (for the TUI) --------------------------------------------


# --- plan ------------------------------------------------------------------------------------

# --- export ----------------------------------------------------------------------------------


def _adapter_dirs(adapter: Path) -> tuple[Path, Optional[dict]]:
    """(PEFT adapter dir, run manifest or None) for a run directory or a PEFT directory."""
    adapter = Path(adapter)
    if not adapter.exists():
        raise EdgeTuneError(f"{adapter}: no such adapter directory")
    man = manifest_mod.read(adapter) if adapter.is_dir() else None
    if man is not None:
        return adapter / man.get("adapter", {}).get("peft", "adapter"), man
    from edge_tune.converters import mlx_to_peft

    if mlx_to_peft.is_mlx_adapter_dir(adapter):
        return _peft_copy_of_mlx(adapter), None
    if (adapter / "adapter_config.json").is_file():
        return adapter, None
    raise EdgeTuneError(f"{adapter}: neither an edge-tune run directory (manifest.json), a "
                        "PEFT adapter directory (adapter_config.json) nor an mlx-lm adapter "
                        "directory (adapters.safetensors)")


def _peft_copy_of_mlx(mlx_dir: Path) -> Path:
    """A PEFT copy of an mlx-lm adapter (any, including stock ``mlx_lm lora`` output), kept in
    the cache by content hash so the user's directory is left as it was."""
    from edge_tune.converters import mlx_to_peft
    from edge_tune.fsutil import cache_dir

    digest = sha256_file(mlx_dir / mlx_to_peft.WEIGHTS)[:16]
    cfg_digest = sha256_file(mlx_dir / mlx_to_peft.CONFIG)[:8]
    target = cache_dir() / "mlx-peft" / f"{digest}-{cfg_digest}"
    if not (target / "adapter_config.json").is_file():
        mlx_to_peft.convert(mlx_dir, target)
    return target


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
           outtype: str = "f32", on_event: EventSink = ignore, _base_sha256: Optional[str] = None,
           merge: bool = False, quant: Optional[str] = None, ollama: Optional[Path] = None,
           verify: bool = False, system: Optional[str] = None, vllm: Optional[Path] = None,
           chat_template: Optional[str] = None):
    """Convert a PEFT adapter (or a run's adapter) to a GGUF LoRA adapter; with ``merge``,
    write one GGUF with the adapter merged into the base (``quant``: F16 default, Q4_K_M,
    ...). ``verify`` checks llama.cpp against the training framework afterwards (runs only);
    ``ollama`` writes a Modelfile into that directory (``system``: its SYSTEM prompt).
    ``chat_template`` (``--chat-template``; default: the run's) goes into the Modelfile's
    TEMPLATE and, with ``merge``, into a merged GGUF whose base has none."""
    from edge_tune.converters import peft_to_gguf

    if chat_template is not None and ollama is None and not merge:
        raise EdgeTuneError("--chat-template: applies to --ollama (the Modelfile's TEMPLATE) "
                            "and --merge; an adapter GGUF carries no template")
    peft_dir, man = _adapter_dirs(Path(adapter))
    template = template_choice.choose(chat_template, man)
    if vllm is not None:  # vLLM serves the PEFT directory itself: no GGUF involved
        return _export_vllm(Path(adapter), peft_dir, man, base, Path(vllm), on_event)
    if merge:  # merge reads the base itself: parsing a GGUF's vocabulary twice costs seconds
        return _export_merged(Path(adapter), peft_dir, man, _merge_base(man, base), out,
                              quant or "F16", on_event, verify=verify, ollama=ollama,
                              system=system, template=template)
    info, base_gguf = _base_info_for_export(peft_dir, man, base)
    if quant is not None:
        raise EdgeTuneError("--quant applies to merged exports only: add --merge (an adapter "
                            "GGUF takes --outtype f32|f16|q8_0)")
    if out is None:
        out = (Path(adapter) / "adapter.gguf") if man is not None else \
            Path(adapter).with_name(Path(adapter).name + ".gguf")
    meta = {"general.name": f"edge-tune LoRA ({Path(adapter).name})"}
    if base_gguf is not None:
        meta["edge_tune.base_sha256"] = _base_sha256 or sha256_file(base_gguf)
        meta["edge_tune.base_name"] = Path(base_gguf).name
    plan = peft_to_gguf.convert(peft_dir, info, Path(out), outtype, meta)
    on_event(Log(f"wrote {out} ({len(plan.tensors) // 2} LoRA pairs, rank {plan.rank}, "
                 f"alpha {plan.alpha:g}, {outtype})"))
    if verify and man is not None:
        _verify_hook(Path(adapter), base, on_event, adapter_gguf=Path(out))
    if ollama is not None:
        _write_ollama(Path(ollama), base_gguf, Path(out), system, man, on_event, template)
    on_event(Done("export", {"path": str(out)}))
    return plan


def _vllm_base(peft_dir: Path, man: Optional[dict], base: Optional[Path]) -> str:
    """What ``vllm serve`` loads: a hub ID or an HF directory (vLLM's LoRA needs HF weights)."""
    if base is not None:
        ref = models.resolve(str(base))
        if ref.gguf is not None:
            raise EdgeTuneError(f"--base {base}: vLLM serves LoRA adapters on HF weights; pass "
                                "an HF model directory or hub ID")
        return ref.hub_id or str(ref.hf_dir)
    rec = (man or {}).get("base") or {}
    if rec.get("hub_id") or rec.get("hf_dir"):
        return rec.get("hub_id") or rec["hf_dir"]
    try:
        guess = json.loads((peft_dir / "adapter_config.json").read_text()).get(
            "base_model_name_or_path")
    except (OSError, ValueError):
        guess = None
    if guess:
        return str(guess)
    raise EdgeTuneError(f"{peft_dir}: cannot tell which base model this adapter is for; pass "
                        "--base HF_DIR_OR_HUB_ID")


def _export_vllm(adapter: Path, peft_dir: Path, man: Optional[dict], base: Optional[Path],
                 directory: Path, on_event: EventSink) -> dict:
    from edge_tune.converters import vllm_export

    name = vllm_export.adapter_name(adapter.resolve().name)
    result = vllm_export.export(peft_dir, directory, name, _vllm_base(peft_dir, man, base))
    on_event(Log(f"wrote {result['adapter_dir']} and {result['script']} (max LoRA rank "
                 f"{result['max_lora_rank']} for rank {result['rank']})"))
    on_event(Done("export", {"path": result["adapter_dir"], **result}))
    return result


def _merge_base(man: Optional[dict], base: Optional[Path]) -> Optional[Path]:
    """The GGUF base a merge starts from: --base, else the run's base (None: neither)."""
    if base is not None:
        ref = models.resolve(str(base))
        if ref.gguf is None:
            raise EdgeTuneError(f"--base {base}: --merge needs a GGUF base (make one from an HF "
                                "model with `edge-tune convert-base`)")
        return ref.gguf
    gg = (man or {}).get("base", {}).get("gguf")
    return Path(gg) if gg else None


def _export_merged(adapter: Path, peft_dir: Path, man: Optional[dict], base_gguf: Optional[Path],
                   out: Optional[Path], quant: str, on_event: EventSink, verify: bool,
                   ollama: Optional[Path], system: Optional[str] = None,
                   template: Optional["template_choice.ChatTemplate"] = None) -> dict:
    """Merge into an F32 GGUF first (exact; what verify checks), then let llama.cpp's own
    quantizer make the requested type from it."""
    import tempfile

    from edge_tune.converters import merge as merge_mod
    from edge_tune.converters import quantize as quant_mod
    from edge_tune.converters.peft_to_gguf import read_peft_dir
    from edge_tune.fsutil import atomic_path

    name = quant_mod.normalize(quant)
    if base_gguf is None:
        raise EdgeTuneError(f"{adapter}: --merge needs a GGUF base: pass --base BASE.gguf "
                            "(make one from an HF model with `edge-tune convert-base`)")
    if out is None:
        out = (adapter if man is not None else peft_dir.parent) / f"merged-{name.lower()}.gguf"
    out = Path(out)
    config, tensors = read_peft_dir(peft_dir)
    meta = {"edge_tune.merged_adapter": peft_dir.name,
            "edge_tune.base_sha256": sha256_file(base_gguf)}
    if template is not None:
        own = template_choice.gguf_chat_template(base_gguf)
        if own is None:  # the merged model then chats as it was trained, with no flag
            meta["tokenizer.chat_template"] = template.text
        elif own != template.text:
            on_event(Log(f"--merge: {out or 'the merged model'} keeps the base's own chat "
                         f"template; chat with it using --chat-template "
                         f"{template.name or 'FILE'} (the run's)", "warning"))
    out.parent.mkdir(parents=True, exist_ok=True)
    report = None
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as work:
        f32 = out if name == "F32" else Path(work) / "merged-f32.gguf"
        summary = merge_mod.merge(base_gguf, config, tensors, f32, "F32", where=str(peft_dir),
                                  on_event=on_event, extra_metadata=meta)
        if name != "F32":
            merge_mod.check_disk(out.parent, int(summary["f32_bytes"] *
                                 quant_mod.BITS_PER_WEIGHT[name] // 32), str(out))
            on_event(Progress("quantize", 0, None, "", f"quantizing to {name} (llama.cpp)"))
            with atomic_path(out) as tmp:
                quant_mod.quantize(f32, tmp, name)
            on_event(Progress("quantize", 1, 1, "", f"quantized to {name}"))
        size = out.stat().st_size
        on_event(Log(f"wrote {out} ({summary['merged']} merged tensors"
                     f"{', DoRA' if summary['dora'] else ''}, {name}, {size / 2**20:.0f} MiB)"))
        if verify and man is not None:
            report = _verify_hook(adapter, base_gguf, on_event, merged=out, merged_f32=f32)
    if ollama is not None:
        _write_ollama(Path(ollama), out, None, system, man, on_event, template)
    result = {**summary, "path": str(out), "quant": name, "bytes": size, "verify": report}
    on_event(Done("export", {"path": str(out)}))
    return result


def _place_beside(src: Path, directory: Path) -> str:
    """Put ``src`` in ``directory`` (hard link, else copy) and return its name there."""
    import os
    import shutil

    from edge_tune.fsutil import atomic_path

    dst = directory / src.name
    if dst.exists() and dst.resolve() == src.resolve():
        return src.name
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
    return src.name


def _write_ollama(directory: Path, model_gguf: Optional[Path], adapter_gguf: Optional[Path],
                  system: Optional[str], man: Optional[dict], on_event: EventSink,
                  chosen: Optional["template_choice.ChatTemplate"] = None) -> Path:
    """DIR/Modelfile (FROM model, ADAPTER adapter, TEMPLATE from the chat template: ``chosen``
    (--chat-template or the run's), else the model's own; stop words, SYSTEM), with the files
    it names placed beside it."""
    from edge_tune.converters import ollama
    from edge_tune.converters.base_info import field_value, open_gguf
    from edge_tune.fsutil import write_text_atomic

    if model_gguf is None:
        raise EdgeTuneError("--ollama needs a GGUF base model (pass --base BASE.gguf)")
    reader = open_gguf(Path(model_gguf))
    template = chosen.text if chosen else field_value(reader, "tokenizer.chat_template")
    tokens = field_value(reader, "tokenizer.ggml.tokens") or []
    eos_id = field_value(reader, "tokenizer.ggml.eos_token_id")
    eos = tokens[eos_id] if eos_id is not None and eos_id < len(tokens) else None
    del reader
    go, blocks = None, None
    if template:
        try:
            go, blocks = ollama.translate(template, eos or "")
        except ollama.Untranslatable as exc:
            on_event(Log(f"--ollama: chat template not translated ({exc}); the Modelfile has no "
                         "TEMPLATE, so Ollama falls back to its own detection", "warning"))
    trim_note = ollama.trim_note(blocks)
    if trim_note:
        on_event(Log(f"--ollama: {trim_note}", "warning"))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # A run's base read from Ollama's store is named, not copied: Ollama already has it.
    base_rec = (man or {}).get("base") or {}
    from_ollama = base_rec.get("ollama") if adapter_gguf and base_rec.get("gguf") and \
        Path(base_rec["gguf"]) == Path(model_gguf) else None
    from_name = from_ollama or _place_beside(Path(model_gguf), directory)
    adapter_name = _place_beside(Path(adapter_gguf), directory) if adapter_gguf else None
    text = ollama.modelfile(from_ollama or f"./{from_name}",
                            f"./{adapter_name}" if adapter_name else None, go,
                            ollama.stop_words(blocks, eos), system,
                            note="written by edge-tune export --ollama; run: ollama create NAME "
                                 "-f Modelfile", notes=(trim_note,) if trim_note else ())
    path = directory / "Modelfile"
    write_text_atomic(path, text)
    on_event(Log(f"wrote {path} (FROM {from_name}" + (f", ADAPTER {adapter_name}" if adapter_name
                                                       else "") + ")"))
    return path


# --- convert-base ----------------------------------------------------------------------------


# --- verify ----------------------------------------------------------------------------------


def verify(run: Path, base: Optional[Path] = None, merged: Optional[Path] = None,
           on_event: EventSink = ignore, n_prompts: int = 3, max_new: int = 12,
           _merged_f32: Optional[Path] = None, _adapter_gguf: Optional[Path] = None) -> dict:
    """torch+PEFT vs llama.cpp on the run's held-back prompts (see :mod:`edge_tune.verify`).
    ``merged``: check a merged export instead of the run's adapter GGUF. Returns the report;
    ``report["ok"]`` says whether it is within tolerance."""
    import tempfile

    from edge_tune import verify as verify_mod

    run = Path(run)
    from edge_tune.converters.validate import verify_gguf_only
    verify_gguf_only(run, base)  # an adapter .gguf alone: what can and cannot be checked
    peft_dir, man = _adapter_dirs(run)
    if man is None:
        raise EdgeTuneError(f"{run}: verify needs an edge-tune run directory (its manifest.json "
                            "names the data and the base)")
    mlx_adapter = _mlx_side_for(run, man)
    _, base_gguf = _base_info_for_export(peft_dir, man, base)
    if base_gguf is None:
        raise EdgeTuneError(f"{run}: verify runs llama.cpp and needs a GGUF base: pass --base")
    man_hf = man.get("base", {}).get("hf_dir")
    if man_hf and Path(man_hf, "config.json").is_file() and \
            (base is None or not man.get("base", {}).get("gguf")):
        hf_dir = Path(man_hf)
    else:
        hf_dir = models.dequantized_copy(Path(base_gguf), on_event)
    kw = dict(n_prompts=n_prompts, max_new=max_new, on_event=on_event, mlx_adapter=mlx_adapter)
    if merged is None:
        gg = _adapter_gguf or (run / man["adapter"]["gguf"] if man.get("adapter", {}).get("gguf")
                               else None)
        if gg is None or not Path(gg).is_file():
            raise EdgeTuneError(f"{run}: no adapter.gguf to verify; run `edge-tune export {run}`")
        report = verify_mod.verify_run(run, man, peft_dir, Path(base_gguf), hf_dir,
                                       adapter_gguf=Path(gg), **kw)
    elif _merged_f32 is not None:
        report = verify_mod.verify_run(run, man, peft_dir, Path(base_gguf), hf_dir,
                                       merged=Path(merged), merged_f32=_merged_f32, **kw)
    else:  # the exact check needs the F32 merge: remake it (seconds for small models)
        from edge_tune.converters import merge as merge_mod
        from edge_tune.converters.peft_to_gguf import read_peft_dir

        merge_mod.open_gguf(Path(merged))  # a corrupt file fails here, in one line
        config, tensors = read_peft_dir(peft_dir)
        with tempfile.TemporaryDirectory(prefix="edge-tune-verify-") as work:
            f32 = Path(work) / "merged-f32.gguf"
            merge_mod.merge(Path(base_gguf), config, tensors, f32, "F32", str(peft_dir),
                            on_event)
            report = verify_mod.verify_run(run, man, peft_dir, Path(base_gguf), hf_dir,
                                           merged=Path(merged), merged_f32=f32, **kw)
    result = report.to_dict()
    on_event(Done("verify", {"ok": result["ok"]}))
    return result


def _mlx_side_for(run: Path, man: dict) -> Optional[Path]:
    """An mlx run is checked against mlx itself (its native adapter) where mlx is installed;
    elsewhere against torch+PEFT with the run's PEFT copy."""
    from edge_tune.hardware import missing_modules

    native = man.get("adapter", {}).get("mlx")
    if man.get("backend") != "mlx" or not native or missing_modules("mlx", "mlx_lm"):
        return None
    return run / native


def _verify_hook(run: Path, base: Optional[Path], on_event: EventSink,
                 merged: Optional[Path] = None, merged_f32: Optional[Path] = None,
                 adapter_gguf: Optional[Path] = None) -> dict:
    """The short check ``train`` and ``export`` run by default: two prompts, a few tokens.
    Out of tolerance is an error (exit 1) after the files are written."""
    report = verify(run, base=base, merged=merged, on_event=on_event, n_prompts=2, max_new=8,
                    _merged_f32=merged_f32, _adapter_gguf=adapter_gguf)
    summary = (f"verify: adapter effect error {report['effect_rel_err']:.2e}, top-1 "
               f"{report['top1_agreement']:.0%}, mean KL {report['mean_kl']:.4f} on "
               f"{report['n_prompts']} held-back prompts")
    if not report["ok"]:
        raise CheckFailed(f"{summary}: out of tolerance: {'; '.join(report['failures'])}")
    on_event(Log(summary + " (ok)"))
    return report


# --- chat ------------------------------------------------------------------------------------


@dataclass
class ChatTarget:
    base: Path
    adapter: Optional[Path]
    manifest: Optional[dict]
    # --chat-template, else the run's; None: the base GGUF's own (or none at all)
    chat_template: Optional["template_choice.ChatTemplate"] = None
    system_mode: str = "keep"  # --system-mode, else the run's

    @property
    def stop_tokens(self) -> tuple:
        return tuple((self.manifest or {}).get("stop_tokens") or ())


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
    mode = _system_mode(system_mode) or (man or {}).get("hyperparameters", {}).get(
        "system_mode") or "keep"
    return ChatTarget(base_path, adapter_gguf, man, template_choice.choose(chat_template, man),
                      mode)


def open_engine(target: ChatTarget, on_event: EventSink = ignore, **engine_kw):
    """Load the base in llama.cpp and activate the (validated) adapter, if any."""
    from edge_tune.engine import Engine

    engine = Engine(target.base, chat_template=target.chat_template.text if
                    target.chat_template else None, stop_tokens=target.stop_tokens,
                    system_mode=target.system_mode, **engine_kw)
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


# --- serve -----------------------------------------------------------------------------------


def plan_serving(adapter_specs: list[str], base: Optional[str] = None,
                 chat_template: Optional[str] = None,
                 system_mode: Optional[str] = None) -> ServePlan:
    """``NAME=PATH`` specs (PATH: run dir or adapter .gguf) -> base + adapters. The base is
    ``--base``, else the first run's base, else the embedded default model. Each adapter is
    served with its run's chat template; ``chat_template`` (``--chat-template``) replaces
    every model's, and ``system_mode`` (``--system-mode``) every model's."""
    from edge_tune.server import parse_adapter_spec

    plan = ServePlan(None, {})  # type: ignore[arg-type] -- the base is settled below
    if base is not None:
        plan.base = resolve_chat(None, base).base
    plan.override(chat_template, system_mode)
    for spec in adapter_specs:
        name, path = parse_adapter_spec(spec)
        if name in plan.adapters:
            raise EdgeTuneError(f"--adapter {spec}: the name {name!r} is used twice")
        target = resolve_chat(Path(path), base, chat_template, system_mode)
        plan.add(name, target)
        plan.base = plan.base or target.base
    plan.base = plan.base or models.default_gguf()
    return plan


def open_serving(plan: ServePlan, on_event: EventSink = ignore, **engine_kw):
    """Load the base once and every adapter once, each validated against the base first,
    with each model's chat template (see :class:`ServePlan`)."""
    from edge_tune.engine import Engine

    engine = Engine(plan.base, chat_template=plan.templates.get("base"),
                    stop_tokens=plan.stop_tokens.get("base", ()),
                    system_mode=plan.system_modes.get("base", "keep"), **engine_kw)
    try:
        base_sha = plan.base_sha256
        for name, path in plan.adapters.items():
            engine.add_adapter(path, name)
            engine.set_chat_template(plan.templates.get(name), name,
                                     plan.stop_tokens.get(name, ()), plan.system_modes.get(name))
            trained_on = engine.adapter_meta[name].get("edge_tune.base_sha256")
            if trained_on:
                base_sha = base_sha or sha256_file(plan.base)
                if trained_on != base_sha:
                    on_event(Log(f"{path} ({name}) was trained on a different base file than "
                                 f"{plan.base} (sha256 differs); its answers may be off",
                                 "warning"))
    except BaseException:
        engine.close()
        raise
    return engine


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise EdgeTuneError(f"--host {host}: cannot resolve ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise EdgeTuneError(f"--port {port}: cannot listen on {host}:{port} "
                                f"({exc.strerror}); pick another --port") from None


def serve(plan: ServePlan, host: str = "127.0.0.1", port: int = 8000,
          api_key: Optional[str] = None, n_ctx: int = 4096, max_queue: int = 64,
          threads: Optional[int] = None, on_event: EventSink = ignore) -> None:
    """Run the OpenAI-compatible server until interrupted (blocks)."""
    try:
        import uvicorn

        from edge_tune.server.app import build_app
    except ImportError:
        raise EdgeTuneError("the server needs starlette and uvicorn: pip install "
                            "'edge-tune[run]'") from None
    from edge_tune.server import steady_malloc
    from edge_tune.server.scheduler import Scheduler

    _check_port_free(host, port)
    steady_malloc()
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        on_event(Log(f"listening on {host} without --api-key: anyone who can reach this "
                     "port can use the models", "warning"))
    engine = open_serving(plan, on_event, n_ctx=n_ctx, threads=threads)
    scheduler = Scheduler(engine, max_queue=max_queue)
    names = ["base", *plan.adapters]
    untemplated = [n for n in names if engine.template_of(None if n == "base" else n) is None]
    if untemplated:
        on_event(Log(f"{plan.base.name} has no chat template: /v1/chat/completions answers "
                     f"HTTP 400 for {', '.join(untemplated)} (/v1/completions works); "
                     f"{template_choice.no_template_hint()}", "warning"))
    try:
        app = build_app(scheduler, names, api_key)
        shown = f"[{host}]" if ":" in host else host
        on_event(Log(f"serving {plan.base.name} as {', '.join(names)} on "
                     f"http://{shown}:{port}/v1 (Ctrl-C stops)"))
        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                access_log=False, lifespan="off")
        uvicorn.Server(config).run()
    finally:
        scheduler.close()
        engine.close()
    on_event(Done("serve", {}))


def chat_plan(adapter: Optional[str], base: Optional[str], bundle: Optional[Path] = None,
              compare: Optional[str] = None, chat_template: Optional[str] = None,
              system_mode: Optional[str] = None) -> tuple[ServePlan, list]:
    """For ``chat --bundle`` / ``chat --compare``: what to load, and the sides to answer
    with, as [(label, adapter name in the plan or None for the base)] (one or two). Each side
    keeps its run's chat template; ``chat_template``/``system_mode`` replace every side's."""
    def side(spec: Optional[str], plan: ServePlan, slot: str):
        if spec is None or spec == "base":
            return ("base", None)
        if bundle is not None:
            if spec not in bundle_plan.adapters:
                raise EdgeTuneError(f"--adapter {spec}: the bundle has no such adapter; it has "
                                    + ", ".join(["base", *bundle_plan.adapters]))
            plan.adapters[spec] = bundle_plan.adapters[spec]
            for table in ("templates", "stop_tokens", "system_modes"):
                if spec in getattr(bundle_plan, table):
                    getattr(plan, table)[spec] = getattr(bundle_plan, table)[spec]
            return (spec, spec)
        target = resolve_chat(Path(spec), base if base else None, chat_template, system_mode)
        label = Path(spec).name
        if any(path == target.adapter for path in plan.adapters.values()):
            raise EdgeTuneError(f"--compare {spec}: the same adapter on both sides")
        plan.add(slot, target)
        if plan.base is None:
            plan.base = target.base
        return (label, slot)

    if bundle is not None:
        if base is not None:
            raise EdgeTuneError("--bundle: chats with the bundle's own base; leave out --base")
        from edge_tune.bundle import load_bundle

        bundle_plan = load_bundle(bundle)
        plan = ServePlan(bundle_plan.base, {}, bundle_plan.base_sha256)
        for table in ("templates", "stop_tokens", "system_modes"):
            if "base" in getattr(bundle_plan, table):
                getattr(plan, table)["base"] = getattr(bundle_plan, table)["base"]
    else:
        plan = ServePlan(resolve_chat(None, base).base if base else None, {})
    sides = [side(adapter, plan, "left")]
    if compare is not None:
        other = side(compare, plan, "right")
        if other[1] == sides[0][1]:
            raise EdgeTuneError(f"--compare {compare}: the same model on both sides; compare "
                                "an adapter with 'base' or with another adapter")
        if other[0] == sides[0][0]:
            other = (other[0] + " (2)", other[1])
        sides.append(other)
    if plan.base is None:
        plan.base = models.default_gguf()
    runs_template = next((plan.templates[n] for _, n in sides if n in plan.templates), None)
    if runs_template is not None and "base" not in plan.templates:
        # base vs adapter: the same template on both sides, so only the adapter differs
        plan.templates["base"] = runs_template
    plan.override(chat_template, system_mode)
    return plan, sides


# --- bundle ----------------------------------------------------------------------------------


def bundle(runs: list[str], out: Path, base: Optional[str] = None, merged: bool = False,
           quant: Optional[str] = None, on_event: EventSink = ignore,
           chat_template: Optional[str] = None) -> Path:
    """Pack a base and the adapters of ``runs`` (``RUN`` or ``NAME=RUN``) into a folder or
    .tar.gz for an edge box; with ``merged``, one run merged into the base instead. Each
    adapter is served with its run's chat template; ``chat_template`` replaces them all."""
    import tempfile

    from edge_tune import bundle as bundle_mod
    from edge_tune.converters.base_info import from_gguf
    from edge_tune.converters.validate import validate_adapter_file

    if not runs:
        raise EdgeTuneError("bundle: name at least one run directory or adapter .gguf")
    if merged and len(runs) != 1:
        raise EdgeTuneError("--merged: merges one run into the base; name exactly one RUN")
    items, base_path, base_sha, templates = [], None, None, {}
    forced = template_choice.given(chat_template)
    for arg in runs:
        name, path = bundle_mod.split_run_arg(str(arg))  # the TUI passes Paths
        target = resolve_chat(Path(path), base, chat_template)
        if base_path is None:
            base_path, base_sha = target.base, sha256_file(target.base)
        elif target.base != base_path and sha256_file(target.base) != base_sha:
            raise EdgeTuneError(f"bundle: {path} was trained on {target.base}, not on "
                                f"{base_path}; a bundle carries one base")
        items.append((name or bundle_mod.default_name(Path(path)), target.adapter,
                      target.manifest))
        if target.chat_template is not None:
            templates[items[-1][0]] = target.chat_template.text
    info = from_gguf(base_path)
    for _, adapter_gguf, _ in items:
        validate_adapter_file(adapter_gguf, info)  # refuse now, not on the edge box
    template = forced.text if forced else template_choice.gguf_chat_template(base_path)
    with tempfile.TemporaryDirectory() as work:
        if merged:
            name, _, man = items[0]
            template = templates.get(name) or template  # the merged model is the run's
            result = export(Path(bundle_mod.split_run_arg(str(runs[0]))[1]), base=base_path,
                            out=Path(work) / f"{name}-merged.gguf", merge=True, quant=quant,
                            on_event=on_event)
            plan = bundle_mod.plan_bundle(Path(result["path"]), [], template, merged=name)
            if man is not None:
                plan.manifests[name] = man
        else:
            if quant is not None:
                raise EdgeTuneError("--quant applies to --merged bundles only")
            plan = bundle_mod.plan_bundle(base_path, items, template, templates=templates)
        return bundle_mod.write_bundle(plan, Path(out), on_event)
