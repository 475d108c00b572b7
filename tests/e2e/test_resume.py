"""Resumable training: cancel leaves a checkpoint, resume continues it to the same adapter.

Real runs on the CPU of a tiny random Llama with the embedded model's tokenizer (batch 2,
seq-len 64, 8 steps): what is checked is the checkpoint and the resumed schedule, not the model.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from edge_tune import api
from edge_tune import manifest as manifest_mod
from edge_tune.config import build
from edge_tune.errors import EdgeTuneError
from edge_tune.events import Metric
from tests.helpers.cli import assert_one_line_error, run_cli

pytestmark = pytest.mark.slow
STEPS = 8


def _cfg(data, out, model, **kw):
    return build(None, data=str(data), out=str(out), model=str(model), max_steps=STEPS, batch_size=2, seq_len=64,
                 lr=2e-3, rank=4, alpha=8, seed=3, val_split=0.05, verify=False, **kw)


def _adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def straight(demo_jsonl, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    api.train(_cfg(demo_jsonl, out, tiny, save_every=0))
    return out


def test_cancel_leaves_a_checkpoint_and_resume_matches_a_straight_run(demo_jsonl, straight,
                                                                      tiny, tmp_path):
    import torch

    from edge_tune.training.checkpoint import read_state

    out = tmp_path / "run"
    cancel = threading.Event()
    periodic: list[int] = []

    def on_event(event):
        if isinstance(event, Metric) and event.split == "train" and event.step == 3:
            # --save-every 2: the checkpoint of step 2 was written before step 3 began
            # the directory is swapped in by a rename: retry until it is there (the bound only
            # stops a hang; on a busy machine the swap may take a while)
            end = time.monotonic() + 120
            while (state := read_state(out)) is None and time.monotonic() < end:
                time.sleep(0.05)
            periodic.append((state or {}).get("step"))
            cancel.set()

    with pytest.raises(EdgeTuneError) as info:
        api.train(_cfg(demo_jsonl, out, tiny, save_every=2), on_event, cancel=cancel)
    assert info.value.exit_code == 130
    assert "--resume" in str(info.value)
    assert periodic and periodic[0] and periodic[0] % 2 == 0, periodic
    state = api.resume_state(out)
    assert state is not None and state["checkpoint"] and state["total"] == STEPS
    assert 3 <= state["step"] < STEPS, state  # saved again on cancel, at the latest step
    assert not (out / "manifest.json").exists() and not (out / "adapter").exists()
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [
        "adapter.safetensors", "optimizer.safetensors", "state.json"]

    resumed: list[Metric] = []
    result = api.train(None, lambda e: isinstance(e, Metric) and resumed.append(e), resume=out)
    train_steps = [m.step for m in resumed if m.split == "train"]
    assert train_steps == list(range(state["step"] + 1, STEPS + 1))  # continued, not restarted
    assert not (out / "checkpoint").exists()  # finished: no checkpoint left behind
    assert api.resume_state(out) is None
    assert result.manifest.result.steps == STEPS

    a, b = _adapter(straight), _adapter(out)
    assert a.keys() == b.keys()
    for name in a:
        # bf16 compute is deterministic on the same machine and thread count; allow tiny drift
        diff = (a[name] - b[name]).abs().max().item()
        scale = a[name].abs().max().item()
        assert diff <= 1e-4 * max(1.0, scale), (name, diff, scale)
    # and the LoRA weights really moved away from where they started (B starts at zero)
    assert any(torch.count_nonzero(t) for n, t in b.items() if "lora_B" in n)
    straight_loss = manifest_mod.read(straight).result.final_loss
    assert result.manifest.result.final_loss == pytest.approx(straight_loss, rel=1e-3)


def test_optimizer_state_round_trips_through_safetensors_and_json():
    import torch

    from edge_tune.training.checkpoint import flatten_optimizer, unflatten_optimizer

    w = torch.nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.AdamW([w], lr=1e-2, betas=(0.8, 0.95))
    for _ in range(3):
        (w ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
    tensors, meta = flatten_optimizer(opt.state_dict())
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    tensors = {k: v.clone() for k, v in tensors.items()}  # as if read back from the file
    back = unflatten_optimizer(tensors, json.loads(json.dumps(meta)))
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = torch.optim.AdamW([w2], lr=1e-2, betas=(0.8, 0.95))
    opt2.load_state_dict(back)
    for o, p in ((opt, w), (opt2, w2)):
        (p ** 2).sum().backward()
        o.step()
    assert torch.equal(w, w2)


def test_resume_refuses_other_options_and_non_runs(tmp_path):
    assert_one_line_error(run_cli("train", "--resume", str(tmp_path), "--lr", "0.1"),
                          "--resume", "--lr")
    assert_one_line_error(run_cli("train", "--resume", str(tmp_path)), "nothing to resume")
