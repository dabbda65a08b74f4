"""Bounded admission: how many sequences the server holds at once, and draining at shutdown.

A request asks for `prompts x n` sequences. The server holds at most `slots + max_waiting`
of them: those decoding in the engine's slots and a waiting queue of `max_waiting` behind them.
A request that would overflow it is refused at once with 429 and a `Retry-After`, rather than
queued without bound (the engine's own queue would otherwise grow with every client, and with
it every client's latency). A request larger than the whole capacity can never be admitted: 400.
While draining (SIGTERM), every new request gets 503; those admitted before finish.

Only the event loop calls `admit` / `release`, so no lock is needed.
"""

from __future__ import annotations


class NotAdmitted(Exception):
    """status: 429 (full), 503 (draining) or 400 (larger than the capacity); retry_after_s or None."""

    def __init__(self, status: int, message: str, code: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.code, self.retry_after_s = status, code, retry_after_s


class Admission:
    def __init__(self, slots: int, max_waiting: int):
        if slots < 1 or max_waiting < 0:
            raise ValueError(f"slots must be >= 1 and max_waiting >= 0, got {slots}, {max_waiting}")
        self.slots, self.max_waiting = slots, max_waiting
        self.capacity = slots + max_waiting
        self.held = 0  # sequences admitted and not yet released
        self.requests = 0  # requests admitted and not yet released
        self.draining = False

    def admit(self, sequences: int) -> None:
        """Holds `sequences` more, or raises NotAdmitted."""
        if self.draining:
            raise NotAdmitted(503, "The server is shutting down and accepts no new requests.", "server_shutting_down",
                          retry_after_s=5)
        if sequences > self.capacity:
            raise NotAdmitted(400, f"This request asks for {sequences} sequences (prompts x n); this server holds at "
                               f"most {self.capacity} ({self.slots} slots + max_waiting {self.max_waiting}).",
                          "too_many_sequences")
        if self.held + sequences > self.capacity:
            raise NotAdmitted(429, f"The server is at capacity ({self.held} of {self.capacity} sequences: {self.slots} "
                               f"slots + max_waiting {self.max_waiting}). Retry after a moment.", "rate_limit_exceeded",
                          retry_after_s=1)
        self.held += sequences
        self.requests += 1

    def release(self, sequences: int) -> None:
        self.held -= sequences
        self.requests -= 1

    def drain(self) -> None:
        """From now on every new request is refused with 503."""
        self.draining = True

    @property
    def idle(self) -> bool:
        return self.requests == 0
