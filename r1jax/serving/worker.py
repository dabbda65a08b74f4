"""One background thread owns the `Engine`; the asyncio server talks to it through queues.

    worker = EngineWorker(engine).start()
    queue = asyncio.Queue()
    worker.submit([(rid, prompt_ids, sampling, sample_index)], queue)   # from the event loop
    item = await queue.get()      # an `Event`; `Refused` if the engine refused the request, another
                                  # Exception if an engine step failed
    worker.abort(rid)             # e.g. the client went away: its slot is free for the next step

The engine is not thread-safe, so only the worker thread touches it: requests and aborts go in
through a thread-safe inbox, drained before every step; each step's events go back to their
requests' asyncio queues with one `loop.call_soon_threadsafe` per event loop. Finished requests
are popped from the engine at once, so nothing accumulates there.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from typing import Hashable, Sequence

from r1jax.sampling.engine import Engine, Event, SamplingParams

log = logging.getLogger(__name__)

class Refused(ValueError):
    """The engine refused one request (its prompt or sampling values); the others go on."""


Submission = tuple[Hashable, Sequence[int], SamplingParams, int]  # (request_id, prompt_ids, sampling, sample_index)


class EngineWorker:
    def __init__(self, engine: Engine, *, idle_wait_s: float = 0.5):
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._routes: dict[Hashable, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="r1jax-engine", daemon=True)
        self.steps = 0

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> "EngineWorker":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake",))
        self._thread.join(timeout)

    def submit(self, requests: Sequence[Submission], out: asyncio.Queue) -> None:
        """Queues requests whose events go to `out` (called from the event loop that reads it)."""
        self._inbox.put(("add", list(requests), asyncio.get_running_loop(), out))

    def abort(self, request_id: Hashable) -> None:
        self._inbox.put(("abort", request_id))

    @property
    def active_slots(self) -> int:
        return len(self.engine.running)

    @property
    def waiting(self) -> int:
        return len(self.engine.waiting)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------ worker thread

    def _handle(self, msg) -> None:
        if msg[0] == "add":
            _, requests, loop, out = msg
            for rid, prompt, sampling, sample_index in requests:
                try:
                    self.engine.add_request(rid, prompt, sampling, sample_index=sample_index)
                except Exception as e:  # a refused request fails alone
                    loop.call_soon_threadsafe(out.put_nowait, Refused(str(e)))
                    continue
                self._routes[rid] = (loop, out)
        elif msg[0] == "abort":
            rid = msg[1]
            if self._routes.pop(rid, None) is not None:  # None: unknown, or already finished and popped
                self.engine.abort(rid)

    def _drain(self, block: bool) -> None:
        try:
            msg = self._inbox.get(timeout=self.idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        self._handle(msg)
        while True:
            try:
                self._handle(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.engine.has_work())
            if not self.engine.has_work():
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # the engine's state is unknown: fail everything in it
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            self.steps += 1
            self._deliver(events)

    def _deliver(self, events: list[Event]) -> None:
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = collections.defaultdict(list)
        for ev in events:
            route = self._routes.get(ev.request_id)
            if route is None:
                continue
            if ev.finish_reason is not None:
                del self._routes[ev.request_id]
                self.engine.pop_result(ev.request_id)
            batches[route[0]].append((route[1], ev))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed
                pass

    def _fail_all(self, error: Exception) -> None:
        for rid, (loop, out) in list(self._routes.items()):
            self.engine.abort(rid)
            self.engine.by_id.pop(rid, None)
            try:
                loop.call_soon_threadsafe(out.put_nowait, error)
            except RuntimeError:
                pass
        self._routes.clear()


def _put_all(items: list[tuple[asyncio.Queue, Event]]) -> None:
    for q, ev in items:
        q.put_nowait(ev)
