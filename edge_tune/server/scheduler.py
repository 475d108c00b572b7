"""One worker thread owns the llama.cpp engine; requests wait their turn in a FIFO queue.

Why a single thread: a llama.cpp context is not thread-safe, and there is only one. Keeping
every engine call on one thread (not merely behind a lock) also keeps adapter switches
ordered: the worker activates the job's adapter set (the engine keeps each set's prompt
cache apart, see :meth:`Engine.activate_mix`) and generates, reusing only KV entries of a
common prompt prefix computed under that same set.

The asyncio side talks to the worker through thread-safe hand-offs: each job carries an
asyncio queue that the worker fills with ``loop.call_soon_threadsafe``, and a cancel flag
the web side sets when the client goes away; the worker checks it between tokens, closes
the generation, and moves on to the next job.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from edge_tune.engine import ChatTemplateError, ContextOverflow, NoChatTemplate, Piece
from edge_tune.errors import EdgeTuneError
from edge_tune.server.openai_shapes import GenRequest, RequestError


@dataclass
class Stats:
    """Counters for ``/health``: what the worker has done so far."""

    served: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens_generated: int = 0
    adapter_switches: int = 0
    prompt_tokens: int = 0  # prompt tokens of every answer, cached or not
    prompt_tokens_cached: int = 0  # of those, taken from the prompt cache (not evaluated)
    busy: bool = False


@dataclass
class Job:
    request: GenRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def post(self, *event) -> None:
        """Hand an event to the job's asyncio side (called from the worker thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    """Serialises generation on one engine. Events a job receives, in order:
    ``("piece", Piece)``... then ``("done", Piece)`` or ``("error", RequestError)``."""

    def __init__(self, engine, max_queue: int = 64) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.stats = Stats()
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="edge-tune-engine",
                                        daemon=True)
        self._stopping = False
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def submit(self, request: GenRequest) -> Job:
        if self._jobs.qsize() >= self.max_queue:
            raise RequestError(503, f"the server is busy ({self.max_queue} requests queued); "
                                    "retry later", type="server_error", code="queue_full")
        job = Job(request, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    async def call(self, fn):
        """Run ``fn(engine)`` on the worker thread, between two jobs, and return its result
        (or raise its exception): how adapters are added and removed while serving. Not
        bounded by ``max_queue``."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def settle(result, exc):
            if not done.done():
                done.set_exception(exc) if exc is not None else done.set_result(result)

        def run():
            try:
                result, exc = fn(self.engine), None
            except Exception as err:  # noqa: BLE001 -- handed to the caller
                result, exc = None, err
            loop.call_soon_threadsafe(settle, result, exc)

        self._jobs.put(run)
        return await done

    def close(self) -> None:
        """Stop the worker after the current job; the engine is closed by its owner."""
        self._stopping = True
        self._jobs.put(None)
        self._thread.join(timeout=30)

    # --- the worker thread -----------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._stopping:
                return
            if callable(job):  # an engine call from Scheduler.call
                job()
                continue
            if job.cancelled.is_set():  # gave up while queued: costs nothing
                self.stats.cancelled += 1
                continue
            self.stats.busy = True
            try:
                self._run(job)
            except RequestError as exc:
                self.stats.failed += 1
                job.post("error", exc)
            except ContextOverflow as exc:
                self.stats.failed += 1
                job.post("error", RequestError(400, f"{exc}; shorten the prompt or start the "
                                                    "server with a larger --ctx",
                                               code="context_length_exceeded"))
            except ChatTemplateError as exc:  # the conversation's fault, not the server's
                self.stats.failed += 1
                job.post("error", RequestError(400, str(exc), param="messages",
                                               code="invalid_chat_template"))
            except NoChatTemplate:
                self.stats.failed += 1
                job.post("error", RequestError(
                    400, f"the model '{job.request.model}' has no chat template, so it cannot "
                         "take messages: send a prompt to /v1/completions, or restart the "
                         "server with --chat-template NAME|FILE", param="messages",
                    code="no_chat_template"))
            except EdgeTuneError as exc:
                self.stats.failed += 1
                job.post("error", RequestError(500, str(exc), type="server_error"))
            except Exception as exc:  # noqa: BLE001 -- a bug: tell this client, serve the rest
                self.stats.failed += 1
                job.post("error", RequestError(500, f"internal error: {exc!r}",
                                               type="server_error"))
            finally:
                self.stats.busy = False

    def _run(self, job: Job) -> None:
        req = job.request
        mix = adapter_mix(req)
        gone = [name for name, _ in mix if name not in self.engine.adapter_meta]
        if gone:  # removed while the request waited
            raise RequestError(404, f"The model '{gone[0]}' does not exist (it was removed)",
                               param="model", code="model_not_found")
        if self.engine.active_mix != mix:
            self.engine.activate_mix(mix)
            self.stats.adapter_switches += 1
        pieces = self.engine.generate(messages=req.messages, prompt=req.prompt,
                                      temperature=req.temperature, max_tokens=req.max_tokens,
                                      seed=req.seed, **req.sampling)
        last = None
        try:
            for piece in pieces:
                if job.cancelled.is_set() or self._stopping:  # client left / shutting down
                    self.stats.cancelled += 1
                    return
                last = piece
                if piece.finish_reason is None:
                    job.post("piece", piece)
        finally:
            pieces.close()
            if last is not None:
                self.stats.tokens_generated += last.completion_tokens
                self.stats.prompt_tokens += last.prompt_tokens
                self.stats.prompt_tokens_cached += last.cached_tokens
        self.stats.served += 1
        job.post("done", last or Piece("", "stop"))


def adapter_mix(req: GenRequest) -> tuple:
    """The adapter set a request runs under, as :meth:`Engine.activate_mix` takes it:
    ``((name, scale), ...)``; the request's own ``adapters`` mix when it gives one, else its
    ``model``'s adapter at scale 1 (``base``: none)."""
    mix = getattr(req, "adapters", None)
    if mix:
        return tuple((str(n), float(s)) for n, s in mix)
    return () if req.adapter is None else ((req.adapter, 1.0),)


def wait_idle(scheduler: Scheduler, timeout: float = 10.0) -> bool:
    """For tests and benchmarks: True once nothing is running or queued."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not scheduler.stats.busy and scheduler.queued == 0:
            return True
        time.sleep(0.02)
    return False
