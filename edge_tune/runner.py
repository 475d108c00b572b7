"""Start training in a subprocess, stream its JSON-lines events, and cancel it for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

from edge_tune.errors import EdgeTuneError
from edge_tune.events import Done, EventSink, Failed, Log, from_json

GRACE_SECONDS = 20  # after SIGTERM the worker writes its checkpoint (~1 s), then exits


class TrainingProcess:
    """One training subprocess. ``wait()`` relays events and returns the Done result."""

    def __init__(self, job: dict, run_dir: Path, on_event: EventSink) -> None:
        self.run_dir = Path(run_dir)
        self.on_event = on_event
        self.run_dir.mkdir(parents=True, exist_ok=True)
        job_file = self.run_dir / ".job.json"
        job_file.write_text(json.dumps(job))
        self.log_path = self.run_dir / "train.log"
        # A resumed run appends to the log of the run it continues.
        self._log = open(self.log_path, "a" if job.get("resume_from") else "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                   HF_HUB_DISABLE_TELEMETRY="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_tune.backends.worker", str(job_file)],
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
            self.proc.wait(timeout=GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self) -> dict:
        result: Optional[dict] = None
        failure: Optional[Failed] = None
        try:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                try:
                    event = from_json(line)
                except (ValueError, TypeError):
                    self.on_event(Log(line.rstrip(), "debug"))
                    continue
                if isinstance(event, Done):
                    result = event.result
                elif isinstance(event, Failed):
                    failure = event
                else:
                    self.on_event(event)
            code = self.proc.wait()
        except BaseException:
            self.cancel()
            raise
        finally:
            self._log.close()
            (self.run_dir / ".job.json").unlink(missing_ok=True)
        if self._cancelled.is_set():
            resumable = (self.run_dir / "checkpoint" / "state.json").is_file()
            raise EdgeTuneError("training cancelled" + (
                f"; resume with `edge-tune train --resume {self.run_dir}`" if resumable
                else ""), 130)
        if failure is not None:
            raise EdgeTuneError(failure.message, failure.exit_code)
        if code != 0 or result is None:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
            raise EdgeTuneError(f"training process exited with code {code}: {tail[0][:200]} "
                                f"(full log: {self.log_path})", 1)
        return result
