"""Preemption notices: SIGTERM (how Cloud TPU and most schedulers announce a preemption) or SIGINT
stops a run at the next step boundary, with a checkpoint, and the process exits 0; `resume:
auto` then continues from that checkpoint bit-exactly. A second signal is not caught: it does
what it would have done without this (terminate, KeyboardInterrupt).

    with StopRequest() as stop:
        for step in ...:
            ...
            if stop.requested():   # every process gets the same answer
                save; break
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Catches SIGTERM / SIGINT while entered (main thread only; elsewhere it never fires)."""

    def __init__(self, signals: tuple[int, ...] = SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # the next one acts as usual
        log.warning("%s: checkpointing at the end of this step, then stopping (again to stop now)",
                    signal.Signals(signum).name)

    def requested(self) -> bool:
        """Whether any process was signalled. Multi-host: every process must call this at the same
        step (a tiny all-gather), so they all stop after the same step and save it together."""
        local = self.signum is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.int32(local))))
