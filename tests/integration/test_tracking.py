"""Run tracking: TensorBoard event files in RUN/tb, RUN/loss.png, --report-to none.

Real runs on a tiny random Llama (hidden 64, 2 blocks); the event files are read back with
TensorBoard's own EventAccumulator, the PNG by its header.
"""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def data(demo_jsonl, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(demo_jsonl.read_text().splitlines(keepends=True)[:12]))
    return path


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's signature and IHDR chunk (PNG spec, section 11.2.2)."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    return struct.unpack(">II", head[16:24])


def scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(tb_dir.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _train(tiny: Path, data: Path, out: Path, cancel=None, on_event=None, **flags):
    from edge_tune import api
    from edge_tune.config import build

    cfg = build(None, data=str(data), model=str(tiny), backend="cpu", out=str(out),
                batch_size=4, seq_len=64, lr=1e-2, verify=False, **flags)
    return api.train(cfg, on_event or (lambda e: None), cancel=cancel)


def test_tensorboard_events_and_loss_png(tiny, data, tmp_path):
    run = _train(tiny, data, tmp_path / "run", max_steps=4, val_split=0.25,
                 eval_every=2).run_dir
    seen = scalars(run / "tb")
    assert [s for s, _ in seen["train/loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in seen["val/loss"]] == [2, 4]
    assert {"train/learning_rate", "train/tokens_per_second"} <= set(seen)
    losses = api_losses(run)
    assert [v for _, v in seen["train/loss"]] == pytest.approx(losses, rel=1e-5)
    assert png_size(run / "loss.png") == (800, 480)
    assert (run / "loss.png").stat().st_size > 5000  # axes, two curves and a legend drawn


def api_losses(run: Path) -> list[float]:
    import json

    return json.loads((run / "manifest.json").read_text())["result"]["losses"]


def test_report_to_none_and_loss_png_on_cancel(tiny, data, tmp_path):
    from edge_tune.errors import Cancelled
    from edge_tune.events import Metric

    cancel = threading.Event()

    def on_event(event) -> None:
        if isinstance(event, Metric) and event.step >= 2:
            cancel.set()

    with pytest.raises(Cancelled):
        _train(tiny, data, tmp_path / "run", cancel=cancel, on_event=on_event, max_steps=400,
               report_to="none")
    run = tmp_path / "run"
    assert not (run / "tb").exists() and not list(run.rglob("events.out.tfevents.*"))
    assert (run / "checkpoint").is_dir()  # cancelled, resumable
    assert png_size(run / "loss.png") == (800, 480)


def test_tracker_without_training(tmp_path):
    """The tracker alone: metrics in, events out, picture at close; nothing for no metrics."""
    from edge_tune import tracking
    from edge_tune.events import Log, Metric

    seen: list = []
    tracker = tracking.Tracker("tensorboard", tmp_path, {"rank": 8}, seen.append)
    sink = tracker.sink(seen.append)
    sink(Log("hello"))
    for step in range(1, 4):
        sink(Metric(step=step, total_steps=3, loss=3.0 - step, learning_rate=1e-3))
    sink(Metric(step=3, total_steps=3, loss=1.5, split="val"))
    tracker.close()
    assert len(seen) == 5  # every event still reaches the front end
    got = scalars(tmp_path / tracking.TB_DIR)
    assert got["train/loss"] == [(1, 2.0), (2, 1.0), (3, 0.0)] and got["val/loss"] == [(3, 1.5)]
    assert png_size(tmp_path / tracking.LOSS_PNG) == (800, 480)

    empty = tmp_path / "empty"
    empty.mkdir()
    tracking.Tracker("tensorboard", empty, {}, seen.append).close()
    assert list(empty.iterdir()) == []


def test_missing_tracker_package_is_one_line():
    from edge_tune import tracking
    from edge_tune.errors import UsageError
    from edge_tune.hardware import missing_modules

    for name in ("wandb", "mlflow"):
        if missing_modules(name):
            with pytest.raises(UsageError, match=f"pip install {name}"):
                tracking.check(name)
    tracking.check("none")
    tracking.check("tensorboard")


# --- wandb and mlflow, offline, read back ------------------------------------------------------

def _feed(tracker) -> list:
    """Three train steps and a validation point of a preference run through ``tracker``."""
    from edge_tune.events import Metric

    seen: list = []
    sink = tracker.sink(seen.append)
    for step in range(1, 4):
        sink(Metric(step=step, total_steps=3, loss=3.0 - step, learning_rate=1e-3,
                    tokens_per_second=10.0, reward_margin=0.1 * step, reward_accuracy=0.5))
    sink(Metric(step=3, total_steps=3, loss=1.5, split="val", reward_margin=0.4,
                reward_accuracy=1.0))
    tracker.close()
    assert len(seen) == 4 and not [e for e in seen if getattr(e, "level", "") == "warning"]
    return seen


def wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B transaction log (``run-*.wandb``): a 7-byte header (":W&B", a
    uint16 magic, a version byte), then LevelDB's log format (32 KiB blocks of chunks with a
    7-byte header: CRC32, uint16 length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4;
    https://github.com/google/leveldb/blob/main/doc/log_format.md). wandb >= 0.30 ships no
    Python reader (its Go core writes the file)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, parts, out = 7, 32768, [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0:
            break
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            out.append(b"".join(parts))
            parts = []
    return out


def test_wandb_offline_run_in_the_run_dir_has_the_logged_loss(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    from edge_tune import tracking

    monkeypatch.delenv("WANDB_MODE", raising=False)  # edge-tune's default: offline
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # dir= wins over it
    _feed(tracking.Tracker("wandb", tmp_path, {"rank": 8, "method": "dpo"}, lambda e: None))
    logs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, list(tmp_path.rglob("*"))
    history, config = [], {}
    for data in wandb_records(logs[0]):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            # an item names its key by ``key`` or, for some ("_step"), by ``nested_key``
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in record.history.item})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    assert [(h["_step"], h["train/loss"]) for h in history] == [(1, 2.0), (2, 1.0), (3, 0.0)]
    assert history[-1]["val/loss"] == 1.5 and history[-1]["val/reward_accuracy"] == 1.0
    assert history[1]["train/reward_margin"] == pytest.approx(0.2)
    assert config["rank"] == 8 and config["method"] == "dpo"
    assert png_size(tmp_path / tracking.LOSS_PNG) == (800, 480)


def test_mlflow_store_in_the_run_dir_has_the_logged_loss(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install mlflow)")
    pytest.importorskip("sqlalchemy", reason="MLflow's SQLite store needs sqlalchemy")
    from mlflow.tracking import MlflowClient

    from edge_tune import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # edge-tune's default store
    _feed(tracking.Tracker("mlflow", tmp_path, {"rank": 8, "method": "dpo"}, lambda e: None))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_name == tmp_path.name
    assert runs[0].info.status == "FINISHED" and runs[0].data.params["rank"] == "8"
    run_id = runs[0].info.run_id
    loss = [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(loss) == [(1, 2.0), (2, 1.0), (3, 0.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/loss")] == [
        (3, 1.5)]
    margin = client.get_metric_history(run_id, "train/reward_margin")
    assert sorted(m.value for m in margin) == pytest.approx([0.1, 0.2, 0.3])


def test_a_full_disk_in_tensorboards_writer_thread_is_one_warning(tmp_path, capfd):
    """TensorBoard writes from its own thread; a full disk there is a warning, not a thread
    traceback in the middle of the CLI's output."""
    import errno
    import threading

    from edge_tune.events import Log
    from edge_tune.tracking import Tracker

    said = []
    tracker = Tracker("tensorboard", tmp_path, {}, said.append)
    before = threading.excepthook
    tracker._quiet_writer_threads()

    def write() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    thread = threading.Thread(target=write)
    thread.start()
    thread.join()
    tracker.close()
    assert threading.excepthook is before
    assert "Traceback" not in capfd.readouterr().err
    assert [e.message for e in said if isinstance(e, Log)] == [
        f"--report-to tensorboard: metrics not written (no space left on device in "
        f"{tmp_path / 'tb'})"]
