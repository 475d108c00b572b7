"""Cancel and resume for the unsloth backend's Trainer loop (``uq.fit``), on the CPU: real
transformers Trainer + PEFT on a tiny random Llama (Unsloth itself needs a GPU), a real SIGTERM
to this process through the worker's ``checkpoint.Interrupt``, real safetensors checkpoints.

A run cancelled at step k and resumed must equal an uninterrupted one: every step's loss and the
LoRA weights, whether SIGTERM lands inside the optimizer update (it waits for the update to
finish) or in the middle of a forward pass (the step is dropped and done again on resume)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal

import pytest
from tests.helpers.unsloth_model import config, tiny_peft_llama

from edge_tune.training import checkpoint
from edge_tune.training.backends import unsloth as uq
from edge_tune.data.template import IGNORE, Example
from edge_tune.errors import Cancelled, EdgeTuneError
from edge_tune.events import Metric

STEPS = 10


def _data(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    data = []
    for _ in range(n):  # prompt tokens (no loss), then an answer to learn
        k = rng.randint(4, 14)
        prompt = [rng.randint(3, 63) for _ in range(k)]
        answer = [7, 8, 9, rng.randint(10, 12), 2]
        data.append(Example(prompt + answer, [IGNORE] * k + answer))
    return data


def _job(run_dir, save_every=0, resume=False, interrupt=None, **kw) -> dict:
    cfg = config(batch_size=2, grad_accum=2, max_steps=STEPS, lr=1e-2, warmup_steps=2, seed=4,
                 eval_every=4, save_every=save_every, **kw)
    job = {"config": cfg, "examples": _data(24, 0), "val_examples": _data(2, 1), "pad_id": 0,
           "run_dir": str(run_dir)}
    if resume:
        job["resume_from"] = str(run_dir / checkpoint.CHECKPOINT)
    if interrupt is not None:
        job["interrupt"] = interrupt
    return job


def _lora(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _train_losses(events) -> list[tuple[int, float]]:
    return [(e.step, e.loss) for e in events if isinstance(e, Metric) and e.split == "train"]


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and cheap on the shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (module fixtures come before the function-scoped one)
    events: list = []
    model = tiny_peft_llama()
    result = uq.fit(model, _job(tmp_path_factory.mktemp("straight")), events.append, "none")
    torch.set_num_threads(threads)
    assert len(result.losses) == STEPS and result.losses[-1] < 0.7 * result.losses[0]
    return result, _lora(model), events


@pytest.fixture
def sigterm():
    """The worker's SIGTERM handling, installed in this process for one test."""
    previous = signal.getsignal(signal.SIGTERM)
    interrupt = checkpoint.Interrupt().install()
    yield interrupt
    signal.signal(signal.SIGTERM, previous)


def _cancelled_then_resumed(run_dir, straight, interrupt, arm, save_every=0):
    """Fit until ``arm`` sends SIGTERM, then resume in a fresh model; check the run equals the
    straight one and return (checkpoint step after the cancel, events before, events after)."""
    import torch

    before: list = []
    model = tiny_peft_llama()
    disarm = arm(model)
    try:
        with pytest.raises(Cancelled):
            uq.fit(model, _job(run_dir, save_every, interrupt=interrupt), before.append, "none")
    finally:
        disarm()
    state = checkpoint.read_state(run_dir)
    assert state is not None and state["total"] == STEPS and state["slots"] == 2
    assert sorted(p.name for p in (run_dir / checkpoint.CHECKPOINT).iterdir()) == [
        "adapter.safetensors", "optimizer.safetensors", "state.json"]

    after: list = []
    resumed = tiny_peft_llama()  # the same base; its LoRA weights come from the checkpoint
    result = uq.fit(resumed, _job(run_dir, resume=True), after.append, "none")
    ref_result, ref_lora, ref_events = straight
    # Continued at the checkpoint's step, not restarted: the steps after it, once each.
    assert [s for s, _ in _train_losses(after)] == list(range(state["step"] + 1, STEPS + 1))
    # The whole loss curve and every per-step metric of the resumed part equal the straight run's.
    assert result.losses == pytest.approx(ref_result.losses, abs=1e-6)
    ref_steps = dict(_train_losses(ref_events))
    for step, loss in _train_losses(after):
        assert loss == pytest.approx(ref_steps[step], abs=1e-6), step
    ref_metrics = {e.step: e for e in ref_events if isinstance(e, Metric) and e.split == "train"}
    for e in (e for e in after if isinstance(e, Metric) and e.split == "train"):
        assert e.learning_rate == pytest.approx(ref_metrics[e.step].learning_rate)  # no warm-up
    assert result.tokens == ref_result.tokens  # counted on from the checkpoint's
    assert result.val_loss == pytest.approx(ref_result.val_loss, abs=1e-6)
    lora = _lora(resumed)
    assert lora.keys() == ref_lora.keys() and lora
    for name in lora:
        torch.testing.assert_close(lora[name], ref_lora[name], rtol=0, atol=1e-6)
    return state["step"], before, after


def test_sigterm_during_the_update_waits_for_it_and_resume_matches(tmp_path, straight, sigterm):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def arm(model):
        calls = []

        def during_step(optimizer, args, kwargs):  # runs inside AdamW.step: the guarded update
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)

        return register_optimizer_step_pre_hook(during_step).remove

    step, before, _ = _cancelled_then_resumed(tmp_path / "run", straight, sigterm, arm)
    assert step == 3  # the update SIGTERM arrived in was completed and recorded, then it stopped
    assert [s for s, _ in _train_losses(before)] == [1, 2, 3]
    assert any("checkpoint saved at step 3/10" in getattr(e, "message", "") for e in before)


def test_sigterm_mid_forward_drops_that_step_and_periodic_checkpoints(tmp_path, straight,
                                                                      sigterm):
    run_dir = tmp_path / "run"
    periodic = []

    def arm(model):
        forwards = []

        def forward(module, args, kwargs):
            if module.training:  # two micro-batches a step: the 11th is step 6's first
                forwards.append(1)
                if len(forwards) == 11:
                    # a periodic checkpoint (--save-every 2) exists, written after step 4
                    periodic.append(checkpoint.read_state(run_dir)["step"])
                    os.kill(os.getpid(), signal.SIGTERM)  # not guarded: raises right here

        return model.register_forward_pre_hook(forward, with_kwargs=True).remove

    step, before, _ = _cancelled_then_resumed(run_dir, straight, sigterm, arm, save_every=2)
    assert periodic == [4]
    assert step == 5  # step 6 was cut short: its update never happened, resume does it again
    assert [s for s, _ in _train_losses(before)] == [1, 2, 3, 4, 5]


def test_checkpoint_of_another_run_is_one_line(tmp_path):
    model = tiny_peft_llama()
    cfg = _job(tmp_path)["config"]
    checkpoint.save(tmp_path, model, uq.new_optimizer(model, cfg), {
        "step": 2, "total": 99, "slots": 2, "tokens": 10, "losses": [1.0, 1.0],
        "val_loss": None, "train_seconds": 1.0})
    with pytest.raises(EdgeTuneError) as info:
        uq.fit(tiny_peft_llama(), _job(tmp_path, resume=True), lambda e: None, "none")
    message = str(info.value)
    assert "\n" not in message and "checkpoint" in message
    assert "99 steps of 2 micro-batches" in message and f"{STEPS} of 2" in message
    with pytest.raises(EdgeTuneError, match="no checkpoint to resume from"):
        uq.fit(tiny_peft_llama(), _job(tmp_path / "none", resume=True), lambda e: None, "none")


def test_check_checkpoint_is_pure():
    uq.check_checkpoint({"total": 8, "slots": 4}, 8, 4, "RUN/checkpoint")
    with pytest.raises(EdgeTuneError, match="4 micro-batches, this run has 8 of 2"):
        uq.check_checkpoint({"total": 8, "slots": 4}, 8, 2, "RUN/checkpoint")


def test_lr_factor_goes_on_from_the_resumed_step():
    from edge_tune.training.backends.cpu import lr_at

    factor = uq.lr_factor(40, 4, first=10)
    assert [factor(s) for s in range(30)] == pytest.approx([lr_at(10 + s, 40, 1.0, 4)
                                                            for s in range(30)])


def test_api_resumes_an_unsloth_run(tmp_path, demo_jsonl, monkeypatch):
    """api.train no longer refuses --resume for unsloth: the run reaches the training process
    (which, on this GPU-less machine without unsloth, stops at loading it), continuing the
    run's log. The GPU and the backend's availability are the only things faked here."""
    from edge_tune import api
    from edge_tune.training import registry
    from edge_tune.config import TrainConfig
    from edge_tune.fsutil import sha256_file
    from edge_tune.hardware import CudaGpu, probe
    from edge_tune.runs import RUN_CONFIG

    run = tmp_path / "run"
    (run / checkpoint.CHECKPOINT).mkdir(parents=True)
    cfg = TrainConfig(data=str(demo_jsonl), out=str(run), backend="unsloth", max_steps=4,
                      verify=False)
    (run / RUN_CONFIG).write_text(json.dumps(
        {"config": cfg.to_dict(), "data_sha256": sha256_file(demo_jsonl)}))
    (run / checkpoint.CHECKPOINT / "state.json").write_text(json.dumps(
        {"format": checkpoint.FORMAT, "step": 2, "total": 4, "slots": 1}))
    (run / "train.log").write_text("the cancelled attempt\n")
    hw = dataclasses.replace(probe(), cuda_gpus=[CudaGpu("A GPU", 16.0, "8.0", True)])
    monkeypatch.setattr("edge_tune.commands.train.probe", lambda *a, **k: hw)
    monkeypatch.setattr(registry, "choose", lambda requested, hw: ("unsloth", "a GPU"))

    with pytest.raises(EdgeTuneError) as info:
        api.train(None, resume=run)
    message = str(info.value)
    assert "resuming is supported" not in message
    assert "unsloth" in message, message  # the worker's: no unsloth module / no CUDA device
    log = (run / "train.log").read_text()
    assert log.startswith("the cancelled attempt\n") and "unsloth" in log  # appended: a resume
    assert api.resume_state(run)["checkpoint"]  # a failed resume keeps the checkpoint
