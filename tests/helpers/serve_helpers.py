"""Shared by the server tests and the serving benchmark: two real adapters and a real server.

The first adapter is trained for a few steps on the bundled pirate data (it answers "Arr,
matey! ..."); the second is the same adapter with its alpha negated, which pushes the model
the other way. Both answer differently from the base and from each other at temperature 0,
so a request served under the wrong adapter shows.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["What is the capital of France?", "Name a fruit.", "What do bees make?",
           "Say hello."]


def trained_adapters(root: Path | None = None) -> dict[str, Path]:
    """{"pirate": run dir, "anti": adapter .gguf}. Trained once and kept in edge-tune's cache
    (``EDGE_TUNE_CACHE``), like the dequantized model: the server tests need *an* adapter,
    and training one costs minutes on a shared 2-core machine."""
    from tests.helpers.gguf_helpers import scaled_copy

    from edge_tune.demo import demo_data
    from edge_tune.fsutil import atomic_path, cache_dir

    root = root or cache_dir() / "test-fixtures"
    run = root / "serve-pirate"
    anti = root / "serve-anti.gguf"
    if not (run / "manifest.json").is_file():
        with atomic_path(run) as tmp:  # a half-trained run is never left for the next session
            proc = subprocess.run([sys.executable, "-m", "edge_tune", "train", "--data",
                                   str(demo_data()), "--max-steps", "8", "--no-verify",
                                   "--out", str(tmp)],
                                  check=False, capture_output=True, text=True, timeout=1200)
            assert proc.returncode == 0, proc.stderr[-3000:]
    if not anti.is_file():
        with atomic_path(anti) as tmp:
            scaled_copy(run / "adapter.gguf", tmp, -1.0)
    return {"pirate": run, "anti": anti}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 120) -> tuple[int, dict]:
    """A plain request with the standard library: (status, JSON body), errors included."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Server:
    """``edge-tune serve`` in a subprocess on a free loopback port."""

    def __init__(self, *args: str, python: str = sys.executable) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
        # A file, not a pipe: nobody reads a pipe while the server runs, and a full one blocks.
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen([python, "-m", "edge_tune", "serve", "--port",
                                      str(self.port), *args], stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True, env=env,
                                     # not the repo: `python -m` puts the working directory
                                     # first on sys.path, which would shadow an installed copy
                                     cwd=tempfile.gettempdir())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError("server exited: " + self.output())
            with contextlib.suppress(OSError):
                if http_json("GET", self.url + "/health", timeout=2)[0] == 200:
                    return
            time.sleep(0.3)
        raise AssertionError("server did not come up")

    def health(self) -> dict:
        return http_json("GET", self.url + "/health")[1]

    def stop(self) -> str:
        """Ctrl-C, as a user would; returns what the server printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        text = self.output()
        self.log.close()
        return text

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()


@contextlib.contextmanager
def running_server(*args: str, python: str = sys.executable):
    server = Server(*args, python=python)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@functools.cache
def cli_answer(prompt: str, adapter: Path | None, max_tokens: int) -> str:
    """``edge-tune chat --prompt ... --temperature 0``: the single-request answer (asked
    once per process: each call loads the model)."""
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    args = [sys.executable, "-m", "edge_tune", "chat", "--prompt", prompt, "--temperature", "0",
            "--max-tokens", str(max_tokens)]
    if adapter is not None:
        args += ["--adapter", str(adapter)]
    proc = subprocess.run(args, check=False, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n")
    return proc.stdout[:-1]


@contextlib.contextmanager
def one_llama_thread():
    """Every llama.cpp process these tests start uses one thread (``EDGE_TUNE_THREADS``).
    The tests compare answers, not speed, and on a machine busy with other work ggml's
    threads stall each other at every op (2 threads measured 4-13x slower than 1 under
    load). The server and the `edge-tune chat` reference both see the same setting."""
    saved = os.environ.get("EDGE_TUNE_THREADS")
    os.environ["EDGE_TUNE_THREADS"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("EDGE_TUNE_THREADS", None)
        else:
            os.environ["EDGE_TUNE_THREADS"] = saved
