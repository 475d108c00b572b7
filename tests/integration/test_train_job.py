"""The typed contracts between training stages: the job the parent hands the worker (a JSON
round trip that refuses unknown and missing keys), the typed config every backend reads, and
the registry's capabilities that the core asks instead of backend names. Pure and fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_tune import api
from edge_tune.training import checkpoint, registry
from edge_tune.training.backends import unsloth as uq
from edge_tune.training.job import TrainJob, as_config, wire_fields
from edge_tune.training.loop import lr_at
from edge_tune.config import TrainConfig, build
from edge_tune.errors import Cancelled, EdgeTuneError
from edge_tune.hardware import CudaGpu
from edge_tune.models import ModelRef
from edge_tune.runs import RUN_CONFIG


def _job(**kw) -> TrainJob:
    values = dict(
        config=build(None, data="d.jsonl", rank=8, alpha=16.0, max_steps=3),
        backend="cpu",
        model_ref=ModelRef("default", gguf=Path("/m/base.gguf"), hub_id="org/m"),
        base_sha256="ab" * 32, records=[{"messages": [{"role": "user", "content": "hi"}],
                                         "where": "d.jsonl:1"}],
        val_records=[], run_dir="/runs/r1", physical_cores=2, cpu_has_bf16=True,
        resume_from=None, chat_template="{{ messages }}")
    return TrainJob(**{**values, **kw})


def test_round_trip_keeps_every_wire_field_and_drops_the_worker_ones():
    job = _job(examples=["not sent"], pad_id=7, interrupt=object())
    text = job.to_json()
    sent = json.loads(text)
    assert set(sent) == {f.name for f in wire_fields()}
    assert not {"examples", "pad_id", "interrupt", "hf_dir", "adapter_dir"} & set(sent)
    back = TrainJob.from_json(text)
    assert back.config == job.config and isinstance(back.config, TrainConfig)
    assert back.model_ref == job.model_ref and isinstance(back.model_ref.gguf, Path)
    assert back.to_dict() == job.to_dict()
    assert (back.examples, back.pad_id, back.interrupt) == ([], 0, None)


def test_unknown_and_missing_keys_are_refused_with_their_names():
    wire = _job().to_dict()
    with pytest.raises(EdgeTuneError, match=r"\.job\.json: unknown key\(s\) rslora"):
        TrainJob.from_json(json.dumps({**wire, "rslora": True}), ".job.json")
    del wire["run_dir"]
    with pytest.raises(EdgeTuneError, match=r"missing key\(s\) run_dir"):
        TrainJob.from_dict(wire)
    wire = _job().to_dict()
    wire["config"] = {k: v for k, v in wire["config"].items() if k != "seed"}
    wire["config"]["use_rslora"] = True
    with pytest.raises(EdgeTuneError, match=r"config: unknown key\(s\) use_rslora; missing "
                                            r"key\(s\) seed"):
        TrainJob.from_dict(wire)
    with pytest.raises(EdgeTuneError, match="model_ref: unknown key"):
        TrainJob.from_dict({**_job().to_dict(), "model_ref": {"spec": "x", "path": "/m"}})
    with pytest.raises(EdgeTuneError, match="not valid JSON"):
        TrainJob.from_json("{")
    # records_file is the one wire field that may be absent (one process has none).
    wire = _job().to_dict()
    del wire["records_file"]
    assert TrainJob.from_dict(wire).records_file is None


def _backend_dict(backend: str) -> dict:
    """A backend's result as the dict it returned before WorkerResult (the same key order)."""
    common = {"steps": 4, "final_loss": 1.5, "val_loss": None, "tokens": 800,
              "tokens_per_second": 120.5, "train_seconds": 6.6}
    if backend == "mlx":
        return {"steps": 4, "final_loss": 1.5, "losses": [2.0, 1.5], "val_loss": 1.75,
                "tokens": 800, "tokens_per_second": 120.5, "train_seconds": 6.6,
                "precision": "fp32", "trainable_parameters": 4096, "mlx_adapter": "mlx"}
    done = {**common, "precision": "bf16", "trainable_parameters": 4096, "losses": [2.0, 1.5],
            "world_size": 2, "examples": 180}
    if backend == "unsloth":
        done = {**done, "precision": "nf4+bf16", "gpu": "NVIDIA H100",
                "peak_vram_bytes": 3 << 30}
    return done


@pytest.mark.parametrize("backend, full", [("cpu", False), ("cpu", True), ("unsloth", False),
                                           ("mlx", False)])
def test_the_worker_result_is_typed_and_its_json_is_what_the_dicts_wrote(backend, full):
    """training_result.json (and the manifest made from it) keep the object the worker's dicts
    made: the same keys and values; for the cpu and unsloth backends the same bytes."""
    from edge_tune.training.job import WorkerResult

    targeted = {} if full else {"target_modules": ["q_proj", "v_proj"]}
    old = {"examples": 90, **_backend_dict(backend), "hf_dir": "/cache/hf", **targeted,
           "peak_rss_bytes": 1 << 30, "tokenizer": {"chat_template": "T", "stop_tokens": ["x"]}}
    result = WorkerResult.from_dict(old)
    assert result.examples == old["examples"] and result.losses == [2.0, 1.5]
    assert result.target_modules == (None if full else ["q_proj", "v_proj"])
    if backend == "mlx":
        assert result.to_dict() == old and result.world_size is None
    else:
        assert json.dumps(result.to_dict()) == json.dumps(old)
    assert WorkerResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    with pytest.raises(EdgeTuneError, match=r"training_result.json: unknown key\(s\) step\b"):
        WorkerResult.from_dict({**old, "step": 3}, "training_result.json")


def test_the_parent_job_as_api_train_builds_it_is_checked_by_the_runner(tmp_path):
    """The runner turns the dict ``api.train`` builds into a TrainJob before anything starts:
    a typo in a key stops it with one line, no subprocess, no job file."""
    from edge_tune.training.runner import TrainingProcess

    wire = _job(run_dir=str(tmp_path)).to_dict()
    wire["resume"] = wire.pop("resume_from")
    with pytest.raises(EdgeTuneError, match=r"unknown key\(s\) resume; missing key\(s\) "
                                            r"resume_from"):
        TrainingProcess(wire, tmp_path, lambda e: None)
    assert not (tmp_path / ".job.json").exists()


def test_a_setting_the_config_does_not_have_cannot_be_read():
    cfg = as_config({"rank": 4, "alpha": 8.0})  # in-process: the rest keep their defaults
    assert (cfg.rank, cfg.alpha, cfg.seed) == (4, 8.0, TrainConfig().seed)
    with pytest.raises(AttributeError):
        cfg.use_rslora  # noqa: B018 (a misspelt setting is an error, not a silent default)
    with pytest.raises(EdgeTuneError, match=r"unknown key\(s\) use_rslora"):
        as_config({"rank": 4, "use_rslora": True})
    with pytest.raises(EdgeTuneError, match=r"unknown key\(s\) cfg"):
        TrainJob.of({"cfg": {}})


def test_rslora_is_a_setting_every_backend_reads():
    # The unsloth backend used to read a key the config never had; now it is a setting
    # (TOML `rslora = true`), default off, passed to PEFT by the cpu backend too.
    assert TrainConfig().rslora is False
    assert build(None, data="d.jsonl", rslora=True).rslora is True
    assert uq.peft_kwargs(TrainConfig(rslora=True))["use_rslora"] is True
    assert uq.peft_kwargs(TrainConfig())["use_rslora"] is False
    from edge_tune.training.backends.mlx import mlx_lora_config

    # mlx-lm's scale is the multiplier itself; the PEFT copy (lora_alpha = scale * r) then
    # scales by alpha/sqrt(r) exactly as PEFT's rsLoRA does.
    assert mlx_lora_config(16, 32.0, ["q_proj"], 2, "m")["lora_parameters"]["scale"] == 2.0
    assert mlx_lora_config(16, 32.0, ["q_proj"], 2, "m", rslora=True)[
        "lora_parameters"]["scale"] == 8.0


def test_capabilities_are_declared_for_every_backend():
    for name, backend in registry.BACKENDS.items():
        assert registry.capabilities(name) is backend.can
        assert backend.can.device in ("cuda", "apple", "cpu")
    assert registry.having("resumable") == ("unsloth", "cpu")
    assert registry.having("multi_process") == ("unsloth", "cpu")
    assert registry.having("packs_batches") == ("cpu",)
    with pytest.raises(EdgeTuneError, match="unknown"):
        registry.capabilities("tpu")
    with pytest.raises(AttributeError):
        registry.having("fast")


def _unsloth_only_here(monkeypatch, **caps):
    """The registry as if only unsloth were available here, with its capabilities replaced."""
    from dataclasses import replace

    from edge_tune.training.registry import BACKENDS

    unsloth = BACKENDS["unsloth"]
    monkeypatch.setitem(BACKENDS, "unsloth", replace(
        unsloth, check=lambda hw: None, can=replace(unsloth.can, **caps)))
    monkeypatch.setattr("edge_tune.commands.train.probe", lambda: _hardware())


def _hardware():
    from edge_tune.hardware import probe

    hw = probe()
    from dataclasses import replace

    return replace(hw, cuda_gpus=[CudaGpu("Test GPU", 16.0, "8.0", "550")])


@pytest.mark.parametrize("caps, flags, expected", [
    (dict(multi_process=False), dict(nproc=2), "--nproc/--nnodes: multi-process"),
    (dict(multi_process=True, device="cuda"), dict(nproc=2), "--nproc 2: the unsloth backend "
                                                             "runs one process per GPU"),
])
def test_capabilities_drive_the_checks_in_train(monkeypatch, tmp_path, demo_jsonl, caps, flags,
                                                expected):
    """The core asks the registry: the same backend name passes or fails a check as its
    declared capabilities change (nothing is trained: the checks come first)."""
    _unsloth_only_here(monkeypatch, **caps)
    cfg = build(None, data=str(demo_jsonl), backend="unsloth", out=str(tmp_path / "r"), **flags)
    with pytest.raises(EdgeTuneError, match=expected):
        api.train(cfg)


def test_resume_asks_whether_the_backend_is_resumable(monkeypatch, tmp_path, demo_jsonl):
    from edge_tune.fsutil import sha256_file

    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(data=str(demo_jsonl), out=str(run), backend="unsloth", max_steps=4)
    (run / RUN_CONFIG).write_text(json.dumps(
        {"config": cfg.to_dict(), "data_sha256": sha256_file(demo_jsonl)}))
    _unsloth_only_here(monkeypatch, resumable=False)
    with pytest.raises(EdgeTuneError, match="resuming is supported"):
        api.train(None, resume=run)


def test_checkpoint_on_cancel_saves_then_raises_cancelled_and_lets_other_errors_through():
    stop, saved, events = checkpoint.Interrupt(), [], []
    with pytest.raises(Cancelled):
        with checkpoint.saved_on_cancel(stop, lambda: saved.append(3) or (3, 8), events.append,
                                        "RUN"):
            raise KeyboardInterrupt
    assert saved == [3] and "checkpoint saved at step 3/8" in events[0].message
    with pytest.raises(ValueError):  # not a cancel: no checkpoint
        with checkpoint.saved_on_cancel(stop, lambda: saved.append(4), events.append, "RUN"):
            raise ValueError("a bug")
    assert saved == [3]
    stop.requested = True  # SIGTERM seen, surfacing wrapped in a library's exception
    with checkpoint.saved_on_cancel(stop, lambda: saved.append(5), events.append, "RUN",
                                    finished=lambda: True):
        raise RuntimeError("wrapped")  # after the last update the run simply completes
    assert saved == [3]
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # saved_on_cancel ignores a second SIGTERM


def test_the_schedule_is_one_formula_for_python_and_traced_arrays():
    """lr_at with array ops (as mlx evaluates it inside a compiled step) equals the Python
    one; numpy stands in for mlx.core here (the same four functions)."""
    import numpy as np

    steps = np.arange(0, 42, dtype=np.float64)
    traced = lr_at(steps, 40, 2e-2, 4, ops=np)
    assert traced.tolist() == [lr_at(int(s), 40, 2e-2, 4) for s in steps]
    assert lr_at(0, 40, 2e-2, 0) == 2e-2 and lr_at(40, 40, 2e-2, 4) == pytest.approx(2e-3)


def test_the_worker_reads_the_job_the_runner_writes(tmp_path, monkeypatch):
    """A real training subprocess: the runner writes the typed job, the worker reads it back
    strictly and gets as far as fetching the base (refused offline: one line, exit 2)."""
    from edge_tune.training.runner import TrainingProcess

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    job = _job(run_dir=str(tmp_path), model_ref=ModelRef("org/absent", hub_id="org/absent"))
    with pytest.raises(EdgeTuneError, match="org/absent.*HF_HUB_OFFLINE") as info:
        TrainingProcess(job, tmp_path, lambda e: None).wait()
    assert info.value.exit_code == 2
    assert not (tmp_path / ".job.json").exists()  # removed once the worker is done
