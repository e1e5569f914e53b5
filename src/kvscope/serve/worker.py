"""The server's one model worker: admitted requests wait in a bounded queue and run one turn at a time.

Sessions have separate caches, so turns of different sessions are not batched: the worker runs each turn to its end
(prefill, then decode) and takes the next. Tokens go back to the request's handler through its asyncio queue as they
are produced. A handler whose client went away sets `cancelled`: a waiting job is skipped, a running one stops at its
next token; either way its session's KV is freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvscope.chat.prompt import TextStream
from kvscope.errors import KvscopeError
from kvscope.runtime import Sampling


class QueueFullError(KvscopeError):
    """More requests wait than `max_waiting`."""


class ShuttingDownError(KvscopeError):
    """The server stopped taking work (SIGTERM) before this request ran."""


@dataclass
class Job:
    session: object
    messages: list[dict]
    max_tokens: int
    sampling: Sampling
    stop: list[str] | None
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.perf_counter)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, payload=None) -> None:
        """Hand an event to the handler's loop: ("token", text), ("done", (result, text)), ("error", exc)."""
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class Worker:
    """A thread that runs queued jobs on the engine, one at a time."""

    def __init__(self, engine, *, max_waiting: int, on_itl: Callable[[float], None] | None = None):
        self.engine, self.max_waiting, self.on_itl = engine, max_waiting, on_itl
        self.queue: deque[Job] = deque()
        self.cv = threading.Condition()
        self.running = 0
        self.closed = False
        self.service_seconds = 1.0  # moving average of a turn's duration, for Retry-After
        self.thread = threading.Thread(target=self._loop, name="kvscope-worker", daemon=True)
        self.thread.start()

    def counts(self) -> tuple[int, int]:
        with self.cv:
            return self.running, len(self.queue)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the requests ahead times the mean turn duration."""
        running, waiting = self.counts()
        return max(1, math.ceil(self.service_seconds * (running + waiting)))

    def submit(self, job: Job) -> None:
        with self.cv:
            if self.closed:
                raise ShuttingDownError("the server is shutting down")
            if len(self.queue) >= self.max_waiting:
                raise QueueFullError(f"{len(self.queue)} requests are waiting, the most the server queues "
                                     f"(--max-waiting {self.max_waiting})")
            self.queue.append(job)
            self.cv.notify()

    def refuse_waiting(self) -> int:
        """Stop taking work: every job still waiting is refused (its handler answers 503). Returns how many."""
        with self.cv:
            self.closed = True
            refused = list(self.queue)
            self.queue.clear()
            self.cv.notify_all()
        for job in refused:
            self.engine.release(job.session)
            job.emit("error", ShuttingDownError("the server is shutting down; this request did not run"))
        return len(refused)

    def join(self, timeout: float | None = None) -> None:
        self.refuse_waiting()
        self.thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.queue and not self.closed:
                    self.cv.wait()
                if not self.queue:
                    return
                job = self.queue.popleft()
                self.running = 1
            try:
                event = self._run(job)
            finally:
                with self.cv:
                    self.running = 0
            if event is not None:  # after the session is released and the slot free: the reply sees a settled store
                job.emit(*event)

    def _run(self, job: Job) -> tuple[str, object] | None:
        if job.cancelled.is_set():
            self.engine.release(job.session, keep_kv=False)
            return None
        start = time.perf_counter()
        stream = TextStream(self.engine.renderer, job.stop)
        last = [None]

        def on_token(token: int) -> bool:
            now = time.perf_counter()
            if last[0] is not None and self.on_itl is not None:
                self.on_itl(now - last[0])
            last[0] = now
            job.emit("token", stream.push(token))
            return job.cancelled.is_set()

        try:
            result = self.engine.run_chat(job.session, job.messages, max_new_tokens=job.max_tokens,
                                          sampling=job.sampling, stop=job.stop, on_token=on_token)
            return "done", (result, stream.finish(result.ids), time.perf_counter())
        except Exception as exc:  # noqa: BLE001 - every failure goes back to its request, the worker lives on
            return "error", exc  # a failed forward already discarded the session's KV (ChatEngine._run_ids)
        finally:
            # a client that went away frees its KV; otherwise the session stays resident for its next turn
            self.engine.release(job.session, keep_kv=not job.cancelled.is_set())
            self.service_seconds = 0.8 * self.service_seconds + 0.2 * (time.perf_counter() - start)
