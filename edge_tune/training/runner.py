"""Start training in a subprocess, stream its JSON-lines events, and cancel it for real."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

from edge_tune.training.job import TrainJob, WorkerResult
from edge_tune.errors import (Cancelled, CheckFailed, EdgeTuneError, ExitCode,
                              error_for_exit_code)
from edge_tune.events import Done, EventSink, Failed, Log, from_json

GRACE_SECONDS = 20  # after SIGTERM the worker writes its checkpoint (~1 s), then exits
# A full run's checkpoint holds every weight and two AdamW moments (1.5 GB for a 135M model):
# on a busy disk that takes longer than an adapter's, and a kill mid-write loses it.
FULL_GRACE_SECONDS = 180


def grace_seconds(cfg: dict) -> int:
    """Seconds ``cancel`` waits for the worker to save its checkpoint before SIGKILL."""
    return FULL_GRACE_SECONDS if cfg.get("full") else GRACE_SECONDS


def world_size(cfg: dict) -> int:
    return max(1, cfg.get("nproc") or 1) * max(1, cfg.get("nnodes") or 1)


def worker_command(job_file: Path, cfg: dict) -> list[str]:
    """The training subprocess: the worker itself, or torchrun starting one worker per rank
    (each reads RANK/WORLD_SIZE from its environment). Pure."""
    worker = ["-m", "edge_tune.training.worker", str(job_file)]
    if world_size(cfg) == 1:
        return [sys.executable, *worker]
    nodes = max(1, cfg.get("nnodes") or 1)
    # One node: --standalone picks a free local port. Several: a c10d rendezvous at rdzv.
    where = (["--standalone"] if nodes == 1 and not cfg.get("rdzv") else
             ["--rdzv-backend", "c10d", "--rdzv-endpoint", cfg["rdzv"], "--rdzv-id", "edge-tune"])
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
            str(cfg.get("nproc") or 1), "--nnodes", str(nodes), *where, "--max-restarts", "0",
            *worker]


_TORCHRUN_FAILURE = re.compile(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.DOTALL)


def failed_rank(log_text: str) -> Optional[tuple[int, int]]:
    """(rank, exit code) of the root cause in torchrun's failure summary, if any. Pure."""
    at = log_text.rfind("Root Cause")
    m = _TORCHRUN_FAILURE.search(log_text[at:]) if at >= 0 else None
    return (int(m.group(1)), int(m.group(2))) if m else None


RECORDS_FILE = ".records.jsonl"


def last_line(log: Path) -> str:
    """The last line of ``log`` that says something: progress bars (tqdm redraws a line with
    carriage returns) are left out, they never say why a process stopped."""
    try:
        lines = log.read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return "?"
    for line in reversed(lines):
        line = line.strip()
        if line and not re.search(r"\d+%\|", line) and "it/s]" not in line and \
                "s/it]" not in line:
            return line
    return "?"


class TrainingProcess:
    """One training subprocess. ``wait()`` relays events and returns the worker's result.

    ``job``: a :class:`TrainJob`, or its wire fields as a dict (checked by
    ``TrainJob.from_dict``: an unknown or missing key is an error)."""

    def __init__(self, job: TrainJob | dict, run_dir: Path, on_event: EventSink) -> None:
        job = job if isinstance(job, TrainJob) else TrainJob.from_dict(job)
        self.run_dir = Path(run_dir)
        self.on_event = on_event
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = job.config.to_dict()
        self.distributed = world_size(config) > 1
        self.grace = grace_seconds(config)
        if self.distributed:
            # Records as JSON lines beside the job: each rank streams the file and keeps only
            # the lines of its shard (edge_tune.data.sharding), instead of parsing them all.
            records = self.run_dir / RECORDS_FILE
            records.write_text("".join(json.dumps(r) + "\n" for r in job.records))
            job = dataclasses.replace(job, records=None, records_file=str(records))
        job_file = self.run_dir / ".job.json"
        job_file.write_text(job.to_json())
        self.log_path = self.run_dir / "train.log"
        # A resumed run appends to the log of the run it continues.
        self._log = open(self.log_path, "a" if job.resume_from else "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                   HF_HUB_DISABLE_TELEMETRY="1")
        self.proc = subprocess.Popen(
            worker_command(job_file, config),
            stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
            start_new_session=True,  # its own process group: cancel() reaches its children
        )
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop training: SIGTERM to the whole group (the worker saves a checkpoint and
        exits), SIGKILL if it lingers past the grace period."""
        self._cancelled.set()
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self) -> WorkerResult:
        """Relay the worker's events to ``on_event`` until it exits; its result, or the
        error its failure (or the way it died) stands for: Cancelled, CheckFailed, or the
        kind of the exit code it reported."""
        result: Optional[WorkerResult] = None
        failure: Optional[Failed] = None
        failures: list[Failed] = []  # under torchrun: one per rank that said why it stopped
        try:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                try:
                    event = from_json(line)
                except (ValueError, TypeError):
                    self.on_event(Log(line.rstrip(), "debug"))
                    continue
                if isinstance(event, Done):
                    result = WorkerResult.from_dict(event.result, "the training result")
                elif isinstance(event, Failed):
                    failure = failure or event  # the first: a peer's cancel follows a crash
                    failures.append(event)
                else:
                    self.on_event(event)
            code = self.proc.wait()
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM to the CLI: the worker saves, we say so
            self.cancel()
            self._drain()
            raise Cancelled(self.stopped_line("training cancelled")) from None
        except BaseException:
            self.cancel()
            raise
        finally:
            self._log.close()
            (self.run_dir / ".job.json").unlink(missing_ok=True)
            (self.run_dir / RECORDS_FILE).unlink(missing_ok=True)
        if failure is not None and failure.exit_code not in (ExitCode.CANCELLED,
                                                             ExitCode.FAILED) and \
                not self.distributed:
            raise error_for_exit_code(failure.message, failure.exit_code)  # e.g. disk full
        if self.distributed and code != 0 and not self._cancelled.is_set():
            # before the cancel test: torchrun SIGTERMs the other ranks when one dies, and
            # their "cancelled" must not hide the rank that stopped the job
            self._raise_distributed_failure(failures, code)
        if self._cancelled.is_set() or (failure is not None and
                                        failure.exit_code == ExitCode.CANCELLED):
            # cancelled here, or the worker was sent SIGTERM by someone else
            raise Cancelled(self.stopped_line("training cancelled"))
        if failure is not None:
            raise error_for_exit_code(failure.message, failure.exit_code)
        if code < 0 and result is None:  # killed by a signal (kill -9, the OOM killer)
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            raise CheckFailed(self.stopped_line(f"the training process was killed ({name})") +
                              f" (full log: {self.log_path})")
        if code != 0 or result is None:
            raise CheckFailed(f"training process exited with code {code}: "
                              f"{last_line(self.log_path)[:200]} (full log: {self.log_path})")
        return result

    def _drain(self) -> None:
        """Read what the stopped worker still printed (its pipe would otherwise be left
        unread; the events are no longer wanted)."""
        try:
            if self.proc.stdout is not None:
                self.proc.stdout.read()
        except (OSError, ValueError):
            pass

    def stopped_line(self, what: str) -> str:
        """``what``, then where the run stands: the step its checkpoint holds and the command
        that continues it, or that no checkpoint was written yet."""
        from edge_tune.training.checkpoint import read_state

        try:
            state = read_state(self.run_dir)
        except EdgeTuneError:
            state = None
        if state is None:
            return f"{what} before its first checkpoint: nothing to resume"
        return (f"{what}: stopped at step {state['step']}/{state['total']}; checkpoint kept in "
                f"{self.run_dir / 'checkpoint'}: continue with `edge-tune train --resume "
                f"{self.run_dir}`")

    def _raise_distributed_failure(self, failures: list[Failed], code: int) -> None:
        """One line naming the rank that stopped the job. A rank that raised says why itself
        ("rank N: ..."); one that died without a word (killed, out of memory) is named by
        torchrun's summary, and rank 0's own complaint (its peer is gone, or torchrun's
        SIGTERM) would only mislead."""
        resume = (f"; resume with `edge-tune train --resume {self.run_dir}`"
                  if (self.run_dir / "checkpoint" / "state.json").is_file() else "")
        rank = failed_rank(self.log_path.read_text(errors="replace"))
        said = [f for f in failures if f.exit_code != ExitCode.CANCELLED]  # torchrun stopped it
        own = [f for f in said if not f.message.startswith("rank ")]  # rank 0's
        peers = [f for f in said if f.message.startswith("rank ")]
        # Rank 0's reason when it is the root cause (bad data fails every rank alike), else
        # the reason of the rank that went first.
        for f in (own + peers) if rank is None or rank[0] == 0 else (
                [f for f in peers if f.message.startswith(f"rank {rank[0]}:")]):
            raise error_for_exit_code(f.message + resume, f.exit_code)
        if rank is None and failures and not said:  # every rank was stopped from outside
            raise Cancelled(self.stopped_line("training cancelled"))
        who = (f"rank {rank[0]} exited with code {rank[1]}" if rank else
               f"a training process failed (torchrun exit code {code})")
        raise CheckFailed(f"distributed training stopped: {who}{resume} "
                          f"(full log: {self.log_path})")


def launch(job: TrainJob | dict, run_dir: Path, on_event: EventSink,
           cancel: Optional[threading.Event], report_to: str, config: dict) -> WorkerResult:
    """Train ``job`` in a subprocess (:class:`TrainingProcess`) and return the worker's
    result. Its events go through the ``report_to`` tracker (``config``: the settings it
    records) to ``on_event``; setting ``cancel`` stops training as :meth:`TrainingProcess.
    cancel` does. The tracker's files and ``loss.png`` are written whether training ends,
    fails or is cancelled (a full disk only warns). Raises what :meth:`TrainingProcess.wait`
    raises."""
    from edge_tune import tracking

    tracker = tracking.Tracker(report_to, run_dir, config, on_event)
    proc = TrainingProcess(job, run_dir, tracker.sink(on_event))
    if cancel is not None:
        def watch() -> None:
            while not cancel.wait(0.2):
                if proc.proc.poll() is not None:
                    return
            proc.cancel()

        threading.Thread(target=watch, daemon=True).start()
    result: Optional[WorkerResult] = None
    try:
        result = proc.wait()
        return result
    finally:  # loss.png and the tracker's files, cancelled or not
        try:
            tracker.close(result.losses if result is not None else None)
        except OSError as exc:  # a full disk: loss.png is not worth losing the run over
            on_event(Log(f"{run_dir}: tracker files / loss.png not written ({exc})",
                         "warning"))
