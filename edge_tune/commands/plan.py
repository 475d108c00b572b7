"""``plan``: what ``train`` would do (backend, peak memory, time, settings changed to fit),
from the data and the model's metadata only."""

from __future__ import annotations

from edge_tune import models
from edge_tune.training import registry
from edge_tune.config import TrainConfig
from edge_tune.data.training import read_training_data
from edge_tune.errors import DataError
from edge_tune.events import EventSink, ignore
from edge_tune.hardware import probe
from edge_tune.planner import describe, fit_plan, step_report
from edge_tune.templates import choice as template_choice


def plan(cfg: TrainConfig, on_event: EventSink = ignore) -> dict:
    """What ``train`` would do: backend, predicted peak memory and time, settings changed to
    fit. Reads the data and model metadata only; loads no model."""
    models.check_spec(cfg.model)
    chosen = template_choice.given(cfg.chat_template)
    # What reading says waits until the data is known to fit --method and the model: a
    # refusal is then the one line it has to be.
    said: list = []
    data = read_training_data(cfg, cfg.data, said.append, val_file=False)
    ref = models.resolve(cfg.model, on_event)  # a download says so while it runs
    template_choice.require_for_conversations(data.records, ref, chosen)
    for event in said:
        on_event(event)
    train_records = data.train
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
        raise DataError("cannot read this model's shape to plan",
                        setting="model", value=cfg.model)
    report = {"backend": backend, "backend_reason": why, "model": ref.spec,
              "records": len(train_records), **p.to_dict(), "summary": describe(p),
              "chat_template": (chosen.name or cfg.chat_template) if chosen else None,
              "preset": cfg.preset, "step": None if cfg.full else step_report(cfg)}
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
