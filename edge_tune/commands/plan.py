"""``plan``: what ``train`` would do (backend, peak memory, time, settings changed to fit),
from the data and the model's metadata only; also the data reading ``train`` shares."""

from __future__ import annotations

import json
from pathlib import Path

from edge_tune import models
from edge_tune.training import registry
from edge_tune.config import TrainConfig
from edge_tune.data.formats import read_records
from edge_tune.data.preference import check_method
from edge_tune.data.split import split_validation
from edge_tune.errors import EdgeTuneError, UsageError
from edge_tune.events import EventSink, Log, ignore
from edge_tune.hardware import probe
from edge_tune.templates import choice as template_choice

PLANNED = ("batch_size", "grad_accum", "seq_len", "grad_checkpoint")  # what the planner may change


def read_data(path: str, cfg: TrainConfig, on_event: EventSink):
    """The records of a data file (``cfg.format``, ``cfg.skip_invalid``), with what was read
    and skipped reported as events."""
    from edge_tune.data.preference import unpaired

    result = read_records(path, fmt=cfg.format, skip_invalid=cfg.skip_invalid,
                          reasoning=cfg.reasoning)
    if result.skipped:
        lines = ", ".join(str(n) for n, _ in result.skipped[:20])
        more = " ..." if len(result.skipped) > 20 else ""
        on_event(Log(f"{path}: skipped {len(result.skipped)} invalid records (lines {lines}{more});"
                     f" first: {result.skipped[0][1]}", "warning"))
    on_event(Log(f"{path}: {len(result.records)} records, format {result.format}"))
    extra = _extra_keys_read(result)
    if extra:
        on_event(Log(f"{path}: also read: {extra}"))
    if result.ignored:
        on_event(Log(f"{path}: {result.ignored_line()} (not read by edge-tune; "
                     "docs/data.md lists the keys each format reads)", "warning"))
    result.records, left_out = unpaired(result.records, cfg.method, cfg.desirable_only, path)
    result.undesirable_left_out = left_out
    if left_out:
        on_event(Log(f"{path}: --desirable-only: trained {len(result.records)} desirable "
                     f"answers; left out {left_out} undesirable ones (label false)"))
    return result


def read_train_data(cfg: TrainConfig, on_event: EventSink):
    """The training data of a run as ``cfg`` names it (``data``: one or several sources,
    ``columns``, ``max_samples``): ``(training ReadResult, the folders' validation ReadResult
    or None, the manifest's additions)``. Says, one line each, what every file is for
    (train/valid/test of a folder: :mod:`edge_tune.data.layouts`), what ``--max-samples`` cut
    and the mix of weighted sources. A folder's valid files are the validation set unless
    ``--val``/``--val-split`` is given (then said to be unused); test files are never read."""
    from edge_tune.data.layouts import columns_text, data_spec, say_parts
    from edge_tune.data.readers import source_parts

    spec = data_spec(cfg.data, cfg.columns, cfg.max_samples, cfg.seed)
    other_val = "--val" if cfg.val else "--val-split" if cfg.val_split else ""
    files = say_parts(source_parts(spec), on_event, other_val)
    if spec.columns:
        on_event(Log(f"--columns {columns_text(spec.columns)}: source columns renamed to "
                     "edge-tune keys"))
    result = read_data(spec, cfg, on_event)
    if cfg.max_samples is not None:
        cut = [f"{s.name} {s.read}" for s in spec.opened]
        on_event(Log(f"--max-samples {cfg.max_samples}: read at most the first "
                     f"{cfg.max_samples} records of each source ({', '.join(cut)})"))
    mix = [{"source": s.name, "weight": s.weight, "read": s.read, "used": s.used}
           for s in spec.opened]
    mixed = len(mix) > 1 or any(m["weight"] != 1.0 for m in mix)
    if mixed:
        said = ", ".join(f"{m['source']} {m['read']} x{m['weight']:g} = {m['used']}"
                         for m in mix)
        on_event(Log(f"mix (seed {cfg.seed}): {said}; {sum(m['used'] for m in mix)} "
                     "training rows"))
    val = None
    if files.get("valid"):
        val = read_data(spec.with_role("valid"), cfg, on_event)
    extra = {"files": files or None, "mix": mix if mixed else None}
    return result, val, extra


# The keys that make a record of its format: not worth a line of their own.
_CORE_KEYS = {"messages", "conversations", "instruction", "input", "output", "prompt",
              "completion", "chosen", "rejected", "text", "preferred_output",
              "non_preferred_output", "role", "content", "from", "value"}


def _extra_keys_read(result) -> str:
    """``system -> a system message ... (12 records); history -> ...``: the keys beyond each
    format's core that shaped what is trained, so a change in reading is never silent."""
    used = result.keys_report()["used"]
    return "; ".join(f"{k} -> {v['to']} ({v['records']})" for k, v in used.items()
                     if k.rsplit(".", 1)[-1] not in _CORE_KEYS)


def job_record(record) -> dict:
    """A record as the training job carries it."""
    from edge_tune.data.formats import job_record

    return job_record(record)  # with the record's tools and FILE:LINE (per-record errors)


def planner_describe(p) -> str:
    from edge_tune.planner import describe

    return describe(p)


def model_shape(ref: models.ModelRef):
    """The planner's view of a model (its shape), from GGUF metadata or config.json."""
    from edge_tune import planner

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
            return planner.shape_from_gguf_fields(arch, fields, int(vocab), tied)
        except (KeyError, TypeError, ValueError):
            return None
    if ref.hf_dir is not None and (Path(ref.hf_dir) / "config.json").is_file():
        config = json.loads((Path(ref.hf_dir) / "config.json").read_text())
        size = sum(f.stat().st_size for f in Path(ref.hf_dir).glob("*.safetensors"))
        try:
            return planner.shape_from_hf_config(config.get("text_config", config), size)
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


def fit_plan(cfg: TrainConfig, ref: models.ModelRef, backend: str, hw, train_records: list):
    """The planner's plan for this run on this machine (``planner.fit``), or None when the
    model's shape cannot be read."""
    import math

    import psutil

    from edge_tune import planner

    shape = model_shape(ref)
    if shape is None:
        return None
    nproc = max(1, cfg.nproc)
    if registry.capabilities(backend).device == "cuda" and hw.cuda_gpus:
        # One rank per GPU: each plans against its own card (the smallest of those used).
        free = min((g.vram_free_gib or g.vram_gib)
                   for g in hw.cuda_gpus[:nproc])
        budget = cfg.memory_gib * planner.GIB if cfg.memory_gib else free * planner.GIB
    else:
        # The planner is per process: with --nproc N each rank holds a full copy of the model
        # on this node, so each gets 1/N of the memory (leaving room for the rest of the box).
        budget = (cfg.memory_gib * planner.GIB if cfg.memory_gib
                  else psutil.virtual_memory().available * 0.9) / nproc
    machine = planner.Machine(budget_bytes=budget,
                              physical_cores=max(1, hw.physical_cores // nproc),
                              cpu_bf16=hw.has_bf16_cpu, apple=hw.apple is not None,
                              gpu_name=hw.cuda_gpus[0].name if hw.cuda_gpus else "")
    per_step = cfg.batch_size * cfg.grad_accum * nproc * max(1, cfg.nnodes)
    steps = cfg.max_steps or max(1, round(cfg.epochs * math.ceil(len(train_records) / per_step)))
    return planner.fit(shape, backend, cfg, machine, steps,
                       _longest_tokens(train_records) or None)


def check_plan(p) -> None:
    """Raise EdgeTuneError when the plan does not fit in memory even at its smallest."""
    from edge_tune.planner import GIB

    if p.fits:
        return
    e = p.estimate
    have = f"but {p.budget_bytes / GIB:.2f} GiB is available"
    if p.config.full:
        state = ("weights", "gradients", "optimizer state")
        fixed = ", ".join(f"{k} {e.parts[k] / GIB:.2f}" for k in state)
        need = sum(e.parts[k] for k in state) / GIB
        raise UsageError(f"--full: full fine-tuning needs {need:.2f} GiB for weights, "
                         f"gradients and optimizer state alone ({fixed} GiB), ~{e.peak / GIB:.2f}"
                         f" GiB at the peak, {have}; train a LoRA adapter instead (drop --full),"
                         " raise --memory-gib or use a smaller model")
    if e.load_peak > p.budget_bytes:
        raise EdgeTuneError(f"loading this model for training needs ~{e.load_peak / GIB:.2f} GiB "
                            f"{have}; free memory, raise --memory-gib or use a smaller model")
    if e.verify_peak > p.budget_bytes and e.peak >= e.verify_peak:  # counted (not CUDA)
        raise EdgeTuneError(f"verify after training (torch and llama.cpp on held-back prompts) "
                            f"needs ~{e.verify_peak / GIB:.2f} GiB {have}; free memory, pass "
                            "--no-verify, or use a smaller model")
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in e.parts.items())
    raise EdgeTuneError(f"this run needs ~{e.peak / GIB:.2f} GiB ({parts} GiB) even at batch "
                        f"size 1 with gradient checkpointing and seq-len {p.config.seq_len}, "
                        f"{have}; free memory or use a smaller model")


def plan(cfg: TrainConfig, on_event: EventSink = ignore) -> dict:
    """What ``train`` would do: backend, predicted peak memory and time, settings changed to
    fit. Reads the data and model metadata only; loads no model."""
    models.check_spec(cfg.model)
    chosen = template_choice.given(cfg.chat_template)
    # What reading says waits until the data is known to fit --method and the model: a
    # refusal is then the one line it has to be.
    said: list = []
    data, folder_val, _ = read_train_data(cfg, said.append)
    check_method(cfg.method, data.format, str(cfg.data))
    records = [job_record(r) for r in data.records]
    train_records, _ = split_validation(
        records, cfg.val_split, cfg.seed,
        [job_record(r) for r in folder_val.records] if folder_val else None)
    ref = models.resolve(cfg.model, on_event)  # a download says so while it runs
    template_choice.require_for_conversations(records, ref, chosen)
    for event in said:
        on_event(event)
    hw = probe()
    backend, why = registry.choose(cfg.backend, hw)
    if cfg.replay:  # --replay: the base's answers are not known yet; MAX_TOKENS-long stand-ins
        from edge_tune.replay import MAX_TOKENS, replay_prompts

        train_records = train_records + [
            {"messages": [{"role": "user", "content": prompt},
                          {"role": "assistant", "content": "x " * MAX_TOKENS}]}
            for prompt in replay_prompts()[:cfg.replay]]
    p = fit_plan(cfg, ref, backend, hw, train_records)
    if p is None:
        raise EdgeTuneError(f"--model {cfg.model}: cannot read this model's shape to plan")
    report = {"backend": backend, "backend_reason": why, "model": ref.spec,
              "records": len(train_records), **p.to_dict(), "summary": planner_describe(p),
              "chat_template": (chosen.name or cfg.chat_template) if chosen else None}
    if cfg.full:  # the trade-off side by side: the same data as a LoRA run (default settings)
        import dataclasses

        lora = fit_plan(dataclasses.replace(cfg, full=False), ref, backend, hw, train_records)
        report["compare"] = {"lora": _side(lora), "full": _side(p)}
        report["lora_rank"] = cfg.rank
    return report


def _side(p) -> dict:
    """One column of ``plan --full``'s comparison: memory, time and output of a plan."""
    d = p.to_dict()
    e = d["estimate"]
    return {"fits": d["fits"], "trained_parameters": e["trained_parameters"],
            "parts_gib": e["parts_gib"], "peak_gib": e["peak_gib"],
            "load_peak_gib": e["load_peak_gib"], "verify_peak_gib": e["verify_peak_gib"],
            "seconds_per_step": e["seconds_per_step"],
            "total_seconds": e["total_seconds"], "output_gib": e["output_gib"],
            "settings": d["settings"], "changes": d["changes"]}
