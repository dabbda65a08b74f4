"""Reward functions in worker processes: a deadline that kills, a memory cap, crashes contained.

    sandbox = RewardSandbox(workers=2, memory_mb=2048, preload=[accuracy_reward])
    rewards.compute_rewards(fns_with_weights, prompts, completions, columns, timeout_s=10, sandbox=sandbox)
    sandbox.close()

A function travels to a worker as its import path "package.module:function" (the worker imports
it once and keeps it), or pickled when it has no path (a functools.partial of one). One that can
be neither (a lambda, a closure, a function of `__main__`) runs in a thread of this process, as
with no sandbox, with a warning. Workers start by 'spawn': forking a process that holds JAX/XLA
threads is unsafe. Spawn re-imports the main script in each worker, so a script that trains at
module level needs the `if __name__ == "__main__":` guard (train.py has it). Each caps its address space (RLIMIT_AS) at memory_mb, so a runaway allocation
raises MemoryError there, or kills that worker, instead of taking the trainer down. A call still
running at its deadline is cancelled, which kills its worker; pebble starts a new one in the
background. A pool broken by a crash is replaced on the next batch.
"""

from __future__ import annotations

import functools
import importlib
import logging
import multiprocessing
import os
import pickle
import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import pebble

logger = logging.getLogger(__name__)

# A worker that does not answer this long after the pool starts is a broken set-up, not a slow reward.
START_TIMEOUT_S = 120.0


def import_path(fn: Callable) -> str | None:
    """fn's "package.module:function" if importing that gives fn back, else None."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(name, str) or module == "__main__" or "." in name:
        return None  # a method, a local function or a lambda has a dotted or "<locals>" qualname
    return f"{module}:{name}" if getattr(sys.modules.get(module), name, None) is fn else None


def _module(fn: Callable) -> str | None:
    path = import_path(getattr(fn, "func", fn))  # functools.partial
    return path.partition(":")[0] if path else None


def run_in_thread(fn: Callable, *args, **kwargs) -> Future:
    """fn(*args, **kwargs) in a daemon thread of this process; a hang there can't be killed, only
    abandoned."""
    # Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so one hang would block exit.
    future: Future = Future()
    future.set_running_or_notify_cancel()  # running: cancel() can't reach a thread, so it must not try

    def call():
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - reported to the caller through the future
            future.set_exception(e)

    threading.Thread(target=call, daemon=True, name=f"reward-{getattr(fn, '__name__', 'fn')}").start()
    return future


# ---- in the worker -----------------------------------------------------------------------


def _start_worker(memory_mb: int, preload: tuple[str, ...]) -> None:
    limit = memory_mb * 2**20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for module in preload:  # now, so the first batch's deadline does not pay for the imports
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - the calls that need it will report it
            logger.warning("reward worker could not import %s: %r", module, e)


@functools.cache
def _resolve(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _call(fn_or_path: str | Callable, prompts, completions, columns) -> list[float | None]:
    fn = _resolve(fn_or_path) if isinstance(fn_or_path, str) else fn_or_path
    # Plain floats back: whatever the function returned need not pickle.
    return [None if v is None else float(v) for v in fn(prompts, completions, **columns)]


# ---- in the trainer ----------------------------------------------------------------------


class RewardSandbox:
    """A pool of `workers` processes, each capped at `memory_mb` of address space, started on
    first use and kept until `close()`. preload: reward functions whose modules every worker
    imports as it starts."""

    def __init__(self, workers: int = 2, memory_mb: int = 2048, preload: Sequence[Callable] = ()):
        if workers < 1 or memory_mb < 1:
            raise ValueError(f"need workers >= 1 and memory_mb >= 1, got {workers}, {memory_mb}")
        self.workers, self.memory_mb = workers, memory_mb
        self.preload = tuple(sorted({m for fn in preload if (m := _module(fn))}))
        self.start_s: float | None = None  # how long the last pool start took
        self._pool: pebble.ProcessPool | None = None
        self._warned: set[str] = set()

    def start(self) -> None:
        """Start the workers and wait until each has answered once; again after a crash broke the pool."""
        if self._pool is not None and self._pool.active:
            return
        if self._pool is not None:
            logger.warning("the reward worker pool broke (a worker died outside a call); starting a new one")
            self._stop()
        t0 = time.perf_counter()
        self._pool = pebble.ProcessPool(max_workers=self.workers, initializer=_start_worker,
                                        initargs=(self.memory_mb, self.preload),
                                        context=multiprocessing.get_context("spawn"))
        for ready in [self._pool.schedule(os.getpid) for _ in range(self.workers)]:
            ready.result(timeout=START_TIMEOUT_S)
        self.start_s = time.perf_counter() - t0
        logger.info("%d reward workers up in %.2fs", self.workers, self.start_s)

    def submit(self, fn: Callable, prompts: list[str], completions: list[str], columns: dict,
               timeout_s: float) -> Future:
        """fn(prompts, completions, **columns) in a worker, killed after timeout_s of running
        (compute_rewards cancels it earlier at the batch's deadline)."""
        payload = import_path(fn) or _pickled(fn)
        if payload is None:
            name = getattr(getattr(fn, "func", fn), "__name__", repr(fn))
            if name not in self._warned:
                self._warned.add(name)
                logger.warning("reward function %s has no import path and does not pickle: it runs in a "
                               "thread of the trainer, without the sandbox (define it at module level)", name)
            return run_in_thread(fn, prompts, completions, **columns)
        self.start()
        try:
            return self._pool.schedule(_call, args=(payload, prompts, completions, columns), timeout=timeout_s)
        except RuntimeError:  # the pool broke since start(): one new pool, then give up
            self.start()
            return self._pool.schedule(_call, args=(payload, prompts, completions, columns), timeout=timeout_s)

    def close(self) -> None:
        """Stop the workers (pending calls are dropped); a later call starts new ones."""
        if self._pool is not None:
            self._stop()

    def _stop(self) -> None:
        self._pool.stop()
        self._pool.join()
        self._pool = None

    def __enter__(self) -> RewardSandbox:
        return self

    def __exit__(self, *_) -> None:
        self.close()


def _pickled(fn: Callable) -> Callable | None:
    """fn if it pickles (and so can be rebuilt in a worker), else None."""
    if getattr(getattr(fn, "func", fn), "__module__", None) == "__main__":
        return None  # resolvable in a spawned worker only when __main__ is a file: don't count on it
    try:
        pickle.dumps(fn)
    except Exception:  # noqa: BLE001 - pickling raises several types
        return None
    return fn
