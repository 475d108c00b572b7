"""The request queue and the thread that owns the llama.cpp context.

A llama.cpp context is not thread-safe and there is only one, so one worker thread does
every decode and every engine call; requests on the same adapter set are decoded together
(continuous batching, :mod:`.batch_loop`), sets take turns, and each sequence generates on
a thread of its own that only samples and waits (the decode rule of
:mod:`edge_tune.llama.batch_rows` makes a greedy answer the same alone or batched, so it equals
``chat --prompt``).

The asyncio side talks to the threads through thread-safe hand-offs: each job carries an
asyncio queue that its sequence thread fills with ``loop.call_soon_threadsafe``, and a
cancel flag the web side sets when the client goes away; the sequence stops at its next
token (or, waiting for a step, is dropped), and its slot serves the next request.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass, field

from edge_tune.llama.engine import ChatTemplateError, ContextOverflow, NoChatTemplate, Piece
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
    decode_steps: int = 0  # llama_decode calls of the batcher
    max_batch: int = 0  # most sequences decoded together in one step
    decode_rows: int = 0  # rows of those steps, filler rows included
    filler_rows: int = 0  # rows decoded only to keep the batching rule (batch_rows)
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

    async def rest_of_answer(self, first: tuple) -> tuple[list[Piece], tuple]:
        """The pieces of the answer from its ``first`` event on, and the event that ended it:
        ``("done", last piece)`` or ``("error", exc)``."""
        pieces, event = [], first
        while event[0] == "piece":
            pieces.append(event[1])
            event = await self.events.get()
        return pieces, event


class Scheduler:
    """Continuous batching on one engine. Events a job receives, in order:
    ``("piece", Piece)``... then ``("done", Piece)`` or ``("error", RequestError)``."""

    def __init__(self, engine, max_queue: int = 64) -> None:
        from edge_tune.server.batch_loop import Batcher

        self.engine = engine
        self.max_queue = max_queue
        self.stats = Stats()
        lock = threading.RLock()
        self._cv = threading.Condition(lock)
        self._waiting: collections.deque = collections.deque()
        self._calls: collections.deque = collections.deque()
        self._batcher = Batcher(engine, self._cv, lock)
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="edge-tune-engine",
                                        daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def submit(self, request: GenRequest) -> Job:
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise RequestError(503, f"the server is busy ({self.max_queue} requests "
                                        "queued); retry later", type="server_error",
                                   code="queue_full")
            job = Job(request, asyncio.get_running_loop())
            self._waiting.append(job)
            self.stats.busy = True
            self._cv.notify_all()
        return job

    async def call(self, fn):
        """Run ``fn(engine)`` on the worker thread once no sequence is generating (new
        requests wait meanwhile), and return its result (or raise its exception): how
        adapters are added and removed while serving. Not bounded by ``max_queue``."""
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

        with self._cv:
            self._calls.append(run)
            self._cv.notify_all()
        return await done

    def close(self) -> None:
        """Stop: sequences end at their next step; the engine is closed by its owner."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        for seq in list(self._batcher.live):
            if seq.thread is not None:
                seq.thread.join(timeout=30)

    # --- the worker thread -----------------------------------------------------------------
    def _work(self) -> None:
        batch = self._batcher
        while True:
            with self._cv:
                while True:
                    batch.drop_cancelled(self._stopping)
                    if self._stopping and not batch.live:
                        return
                    if self._calls and not batch.live:
                        call = self._calls.popleft()
                        break
                    chosen = []
                    if not self._stopping:
                        self._admit()
                    if not batch.sampling:
                        chosen = batch.pick()
                        self.stats.adapter_switches = batch.switches
                    if chosen:
                        call = None
                        self.stats.decode_steps += 1
                        self.stats.max_batch = max(self.stats.max_batch, len(chosen))
                        break
                    self.stats.busy = bool(batch.live or self._waiting)
                    self._cv.wait()
            if call is not None:
                call()
                with self._cv:
                    batch.forget_all()
                continue
            batch.decode(chosen)
            with self._cv:
                batch.deliver(chosen)
                rows = self.engine.batch
                self.stats.decode_rows, self.stats.filler_rows = rows.rows, rows.filler_rows

    def _admit(self) -> None:
        """Give waiting jobs free slots (FIFO), unless an engine call waits for the batch
        to drain."""
        from edge_tune.server.batch_loop import request_key

        while self._waiting and not self._calls:
            job = self._waiting[0]
            if job.cancelled.is_set():  # gave up while queued: costs nothing
                self._waiting.popleft()
                self.stats.cancelled += 1
                continue
            mix = adapter_mix(job.request)
            gone = [name for name, _ in mix if name not in self.engine.adapter_meta]
            if gone:  # removed while the request waited
                self._waiting.popleft()
                self.stats.failed += 1
                job.post("error", RequestError(
                    404, f"The model '{gone[0]}' does not exist (it was removed)",
                    param="model", code="model_not_found"))
                continue
            slot = self._batcher.free_slot(mix, request_key(job.request.messages,
                                                            job.request.prompt))
            if slot is None:
                return
            self._waiting.popleft()
            self.stats.busy = True
            self._batcher.admit(job, mix, slot, self._sequence)

    def _sequence(self, seq) -> None:
        """A sequence's thread: generate, post the pieces, report the end."""
        ok = False
        try:
            ok = self._answer(seq.job, lambda: self.engine.generate(
                messages=seq.job.request.messages, prompt=seq.job.request.prompt,
                temperature=seq.job.request.temperature,
                max_tokens=seq.job.request.max_tokens, seed=seq.job.request.seed,
                sequence=seq.slot.view, mix=seq.mix,
                template_kwargs=seq.job.request.template_kwargs, split_reasoning=True,
                **seq.job.request.sampling))
        finally:
            self._batcher.finished(seq, ok)

    def _answer(self, job: Job, start) -> bool:
        """Run one generation for ``job``; every failure becomes the job's error event.
        True when the answer was complete."""
        from edge_tune.errors import Cancelled

        try:
            return self._run(job, start)
        except Cancelled:
            self._count(cancelled=1)
        except RequestError as exc:
            self._count(failed=1)
            job.post("error", exc)
        except ContextOverflow as exc:
            self._count(failed=1)
            job.post("error", RequestError(400, f"{exc}; shorten the prompt or start the "
                                                "server with a larger --ctx",
                                           code="context_length_exceeded"))
        except ChatTemplateError as exc:  # the conversation's fault, not the server's
            self._count(failed=1)
            job.post("error", RequestError(400, str(exc), param="messages",
                                           code="invalid_chat_template"))
        except NoChatTemplate:
            self._count(failed=1)
            job.post("error", RequestError(
                400, f"the model '{job.request.model}' has no chat template, so it cannot "
                     "take messages: send a prompt to /v1/completions, or restart the "
                     "server with --chat-template NAME|FILE", param="messages",
                code="no_chat_template"))
        except EdgeTuneError as exc:
            self._count(failed=1)
            job.post("error", RequestError(500, str(exc), type="server_error"))
        except Exception as exc:  # noqa: BLE001 -- a bug: tell this client, serve the rest
            self._count(failed=1)
            job.post("error", RequestError(500, f"internal error: {exc!r}",
                                           type="server_error"))
        return False

    def _count(self, **deltas) -> None:
        with self._cv:
            for name, value in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def _run(self, job: Job, start) -> bool:
        pieces = start()
        last = None
        try:
            for piece in pieces:
                if job.cancelled.is_set() or self._stopping:  # client left / shutting down
                    self._count(cancelled=1)
                    return False
                last = piece
                if piece.finish_reason is None:
                    job.post("piece", piece)
        finally:
            pieces.close()
            if last is not None:
                self._count(tokens_generated=last.completion_tokens,
                            prompt_tokens=last.prompt_tokens,
                            prompt_tokens_cached=last.cached_tokens)
        self._count(served=1)
        job.post("done", last or Piece("", "stop"))
        return True


def adapter_mix(req: GenRequest) -> tuple:
    """The adapter set a request runs under, as :meth:`Engine.activate_mix` takes it:
    ``((name, scale), ...)``; the request's own ``adapters`` mix when it gives one, else its
    ``model``'s adapter at scale 1 (``base``: none)."""
    mix = getattr(req, "adapters", None)
    if mix:
        return tuple((str(n), float(s)) for n, s in mix)
    return () if req.adapter is None else ((req.adapter, 1.0),)
