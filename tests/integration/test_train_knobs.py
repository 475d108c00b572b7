"""train's optimization knobs (--warmup/--warmup-ratio, --lr-scheduler, --weight-decay,
--optimizer, --eval-every, --save-total-limit) mean the same on every backend; kept
checkpoint-STEP folders are runs of their own for export and chat.

Schedules and optimizers are checked on the real functions each backend calls (torch's and
mlx's optimizers built as the backends build them); one real cpu run of a tiny random Llama
(6 steps) checks the kept folders, the logged learning rates and `export RUN/checkpoint-STEP`.
"""

from __future__ import annotations

import math

import pytest

from edge_tune.config import LR_SCHEDULERS, build
from edge_tune.errors import EdgeTuneError
from edge_tune.training.loop import lr_at, lr_schedule, torch_optimizer, warmup_for
from tests.helpers.cli import assert_one_line_error, run_cli_in_process

PEAK = 1e-3


def _cfg(**kw):
    return build(None, data="x.jsonl", lr=PEAK, **kw)


def test_each_scheduler_warms_up_then_follows_its_shape():
    total, warmup = 12, 2
    for name in LR_SCHEDULERS:
        lrs = [lr_at(s, total, PEAK, warmup, schedule=name) for s in range(total)]
        assert lrs[:2] == pytest.approx([PEAK / 2, PEAK])  # linear warm-up, 1-based
        after = lrs[warmup:]
        if name == "constant":
            assert after == pytest.approx([PEAK] * len(after))
            continue
        assert after[0] == pytest.approx(PEAK)
        assert all(a >= b for a, b in zip(after, after[1:]))  # decays
        p = (total - 1 - warmup) / (total - warmup)  # progress at the last step
        last = PEAK * (1 - 0.9 * p) if name == "linear" else \
            PEAK * (0.1 + 0.45 * (1 + math.cos(math.pi * p)))
        assert after[-1] == pytest.approx(last)
        mid = warmup + (total - warmup) // 2  # half way: linear and cosine both at 0.55 peak
        assert lrs[mid] == pytest.approx(PEAK * 0.55)
    with pytest.raises(ValueError):
        lr_at(0, total, PEAK, warmup, schedule="polynomial")


def test_warmup_steps_are_capped_and_a_ratio_is_not():
    assert warmup_for(_cfg(warmup_steps=8), 40) == 4  # at most a tenth of the run
    assert warmup_for(_cfg(warmup_steps=3), 40) == 3
    assert warmup_for(_cfg(warmup_ratio=0.25, warmup_steps=1), 40) == 10  # TRL: ceil(r x total)
    assert warmup_for(_cfg(warmup_ratio=0.03), 40) == 2


def test_bad_knob_values_are_one_line():
    for kw, needle in (({"lr_scheduler": "poly"}, "cosine | linear | constant"),
                       ({"optimizer": "lion"}, "adamw | adamw_8bit | sgd | adafactor"),
                       ({"weight_decay": -0.1}, "weight_decay"),
                       ({"warmup_ratio": 1.5}, "warmup_ratio"),
                       ({"save_total_limit": -1}, "save_total_limit")):
        with pytest.raises(EdgeTuneError) as info:
            _cfg(**kw)
        assert needle in str(info.value)
    with pytest.raises(EdgeTuneError, match="--save-total-limit: a LoRA setting"):
        _cfg(full=True, save_total_limit=2)  # its folders hold adapters


def test_weight_decay_and_the_optimizer_reach_torch():
    import torch
    from transformers.optimization import Adafactor

    for name, kind in (("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD),
                       ("adafactor", Adafactor)):
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch_optimizer(_cfg(optimizer=name, weight_decay=0.05), [p])
        assert type(opt) is kind
        group = opt.param_groups[0]
        assert group["weight_decay"] == 0.05 and group["lr"] == PEAK
        if name == "adafactor":  # the given lr, as HF's optim="adafactor" and mlx's below
            assert not group["relative_step"] and not group["scale_parameter"]
    plain = torch_optimizer(_cfg(), [torch.nn.Parameter(torch.ones(1))])
    assert plain.param_groups[0]["weight_decay"] == 0.0  # the default: no decay, as before


def test_weight_decay_and_the_optimizer_reach_mlx():
    pytest.importorskip("mlx.core")
    import mlx.optimizers as optim

    from edge_tune.training.backends.mlx import mlx_lr_schedule, mlx_optimizer

    for name, kind in (("adamw", optim.AdamW), ("sgd", optim.SGD),
                       ("adafactor", optim.Adafactor)):
        cfg = _cfg(optimizer=name, weight_decay=0.05)
        opt = mlx_optimizer(cfg, mlx_lr_schedule(cfg, 6))
        assert isinstance(opt, kind) and opt.weight_decay == 0.05
    with pytest.raises(EdgeTuneError, match="adamw, sgd, adafactor"):
        mlx_optimizer(_cfg(optimizer="adamw_8bit"), lambda step: PEAK)


def test_one_config_gives_the_same_schedule_on_cpu_and_mlx():
    """The lr each backend's optimizer steps with: cpu sets ``lr_at`` per step (the loop's
    call), mlx's optimizer evaluates its traced schedule; read from the mlx optimizer itself
    after each of 6 real updates."""
    pytest.importorskip("mlx.core")
    import mlx.core as mx
    import mlx.nn as nn

    from edge_tune.training.backends.mlx import mlx_lr_schedule, mlx_optimizer

    total = 6
    for name in LR_SCHEDULERS:
        for warm in ({"warmup_steps": 10}, {"warmup_ratio": 0.34}):
            cfg = _cfg(lr_scheduler=name, **warm)
            warmup = warmup_for(cfg, total)
            cpu = [lr_at(s, total, cfg.lr, warmup, schedule=cfg.lr_scheduler)
                   for s in range(total)]
            assert cpu == [lr_schedule(cfg, total)(s) for s in range(total)]
            model = nn.Linear(2, 2)
            opt = mlx_optimizer(cfg, mlx_lr_schedule(cfg, total))
            seen = []
            for _ in range(total):
                grads = {k: mx.ones_like(v) for k, v in model.parameters().items()}
                opt.update(model, grads)
                seen.append(float(opt.learning_rate))
            assert seen == pytest.approx(cpu, rel=1e-6), (name, warm)


def test_an_optimizer_the_backend_lacks_is_refused_naming_its_own(tmp_path, demo_jsonl):
    proc = run_cli_in_process("train", "--data", str(demo_jsonl), "--out", str(tmp_path / "r"),
                              "--backend", "cpu", "--optimizer", "adamw_8bit")
    assert_one_line_error(proc, "adamw_8bit", "cpu", "adamw, sgd, adafactor")


def test_doctor_names_each_backends_optimizers():
    from edge_tune.commands.doctor import doctor

    rows = {r["name"]: r["optimizers"] for r in doctor()["backends"]}
    assert rows["cpu"] == rows["mlx"] == ["adamw", "sgd", "adafactor"]
    assert "adamw_8bit" in rows["unsloth"]
    proc = run_cli_in_process("doctor")
    assert "optimizers (train --optimizer): unsloth: adamw, adamw_8bit" in proc.stdout


# --- a real tiny run: kept checkpoints, the logged schedule, export of one ---------------------


@pytest.fixture(scope="module")
def kept_run(demo_jsonl, tiny, tmp_path_factory):
    from edge_tune import api
    from edge_tune.events import Metric

    out = tmp_path_factory.mktemp("kept") / "run"
    cfg = build(None, data=str(demo_jsonl), out=str(out), model=str(tiny), max_steps=6,
                batch_size=2, seq_len=64, lr=2e-3, rank=4, alpha=8, seed=3, val_split=0.1,
                verify=False, eval_every=2, save_total_limit=2, save_every=0,
                lr_scheduler="linear", warmup_steps=0, weight_decay=0.01)
    events: list = []
    result = api.train(cfg, events.append)
    return out, cfg, result, [e for e in events if isinstance(e, Metric)], events


def test_kept_checkpoints_are_the_newest_and_the_best(kept_run):
    from edge_tune import manifest as manifest_mod
    from edge_tune.events import Log

    out, _, result, metrics, events = kept_run
    val = {m.step: m.loss for m in metrics if m.split == "val"}
    assert sorted(val) == [2, 4, 6]  # --eval-every 2
    best = min(val, key=lambda s: (val[s], s))
    expected = sorted({4, 6, best})  # the newest 2, plus the best
    assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == expected
    rows = manifest_mod.read(out).result.checkpoints
    assert [r["step"] for r in rows] == expected
    assert [r["path"] for r in rows if r["best"]] == [f"checkpoint-{best}"]
    assert all(r["val_loss"] == pytest.approx(val[r["step"]]) for r in rows)
    assert any(isinstance(e, Log) and f"best by validation loss: {out / f'checkpoint-{best}'}"
               in e.message for e in events)
    assert not (out / "checkpoint").exists()  # the resumable one still goes when finished
    assert result.manifest.result.checkpoints == rows


def test_the_cpu_run_logs_the_schedule_mlx_would_use(kept_run):
    pytest.importorskip("mlx.core")
    import mlx.core as mx

    from edge_tune.training.backends.mlx import mlx_lr_schedule

    _, cfg, _, metrics, _ = kept_run
    logged = [m.learning_rate for m in metrics if m.split == "train"]
    mlx = [float(mlx_lr_schedule(cfg, 6)(mx.array(s))) for s in range(6)]
    assert logged == pytest.approx(mlx, rel=1e-6)
    assert logged[0] == pytest.approx(2e-3) and logged[-1] < logged[0]  # linear, no warm-up


def test_a_kept_checkpoint_exports_and_chats_as_a_run(kept_run):
    from safetensors.torch import load_file

    from edge_tune import manifest as manifest_mod
    from edge_tune.adapters import resolve_chat

    out, *_ = kept_run
    last = out / "checkpoint-6"  # the final step's adapter is the run's own
    a = load_file(str(last / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    first = out / "checkpoint-4"
    man = manifest_mod.read(first)
    assert man.result.steps == 4 and man.adapter.gguf is None
    proc = run_cli_in_process("export", str(first))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (first / "adapter.gguf").is_file()
    assert "verify:" in proc.stdout + proc.stderr  # checked against torch+PEFT on the run's prompts
    target = resolve_chat(first, None)
    assert target.adapter == first / "adapter.gguf"
    assert not (out / "checkpoint-4" / "manifest.json").exists()


@pytest.mark.slow  # mlx's Linux CPU build: ~1 min for 6 tiny steps
def test_an_mlx_run_logs_the_cpu_schedule_and_keeps_checkpoints(demo_jsonl, tiny, tmp_path):
    """The same knobs on a real tiny mlx run (mlx's CPU build): its logged learning rates
    are the cpu backend's ``lr_at``, and it keeps the newest folder plus the best."""
    pytest.importorskip("mlx_lm")
    from edge_tune import api
    from edge_tune import manifest as manifest_mod
    from edge_tune.events import Metric

    out = tmp_path / "run"
    cfg = build(None, data=str(demo_jsonl), out=str(out), model=str(tiny), max_steps=6,
                batch_size=2, seq_len=64, lr=2e-3, rank=4, alpha=8, seed=3, val_split=0.1,
                verify=False, eval_every=3, save_total_limit=1, save_every=0, backend="mlx",
                lr_scheduler="cosine", warmup_ratio=0.34, optimizer="sgd", weight_decay=0.01)
    metrics: list = []
    api.train(cfg, lambda e: isinstance(e, Metric) and metrics.append(e))
    logged = [m.learning_rate for m in metrics if m.split == "train"]
    cpu = [lr_at(s, 6, 2e-3, warmup_for(cfg, 6), schedule="cosine") for s in range(6)]
    assert logged == pytest.approx(cpu, rel=1e-6)
    val = {m.step: m.loss for m in metrics if m.split == "val"}
    best = min(val, key=lambda s: (val[s], s))
    assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == \
        sorted({6, best})
    man = manifest_mod.read(out / "checkpoint-6")
    assert man.adapter.peft == "adapter" and man.adapter.mlx is None
    assert (out / "checkpoint-6" / "adapter" / "adapter_config.json").is_file()


def test_sgd_and_adafactor_state_round_trips_through_a_checkpoint():
    """--resume with another optimizer: its state goes through safetensors + JSON as AdamW's."""
    import json

    import torch

    from edge_tune.training.checkpoint import flatten_optimizer, unflatten_optimizer

    for name in ("sgd", "adafactor"):
        cfg = _cfg(optimizer=name, weight_decay=0.01)
        w = torch.nn.Parameter(torch.randn(3, 4))
        opt = torch_optimizer(cfg, [w])
        for _ in range(3):
            (w ** 2).sum().backward()
            opt.step()
            opt.zero_grad()
        tensors, meta = flatten_optimizer(opt.state_dict())
        back = unflatten_optimizer({k: v.clone() for k, v in tensors.items()},
                                   json.loads(json.dumps(meta)))
        w2 = torch.nn.Parameter(w.detach().clone())
        opt2 = torch_optimizer(cfg, [w2])
        opt2.load_state_dict(back)
        for o, p in ((opt, w), (opt2, w2)):
            (p ** 2).sum().backward()
            o.step()
        assert torch.equal(w, w2), name


@pytest.mark.slow  # mlx's Linux CPU build
def test_an_mlx_dpo_run_keeps_checkpoints_too(tiny, tmp_path):
    pytest.importorskip("mlx_lm")
    from edge_tune import api
    from edge_tune.demo import demo_data

    out = tmp_path / "run"
    cfg = build(None, data=str(demo_data().with_name("pref_demo.jsonl")), out=str(out),
                model=str(tiny), max_steps=4, batch_size=2, seq_len=64, lr=2e-3, rank=4,
                alpha=8, seed=3, val_split=0.1, backend="mlx", verify=False, method="dpo",
                eval_every=2, save_total_limit=1, save_every=0)
    result = api.train(cfg)
    rows = result.manifest.result.checkpoints
    assert rows[-1]["step"] == 4 and sum(r["best"] for r in rows) == 1
    assert all((out / r["path"] / "adapter" / "adapter_config.json").is_file() for r in rows)


def test_grpo_refuses_kept_checkpoints(tmp_path, demo_jsonl):
    proc = run_cli_in_process("train", "--data", str(demo_jsonl), "--out", str(tmp_path / "r"),
                              "--backend", "cpu", "--method", "grpo", "--reward", "json",
                              "--save-total-limit", "2")
    assert_one_line_error(proc, "--save-total-limit", "grpo")
