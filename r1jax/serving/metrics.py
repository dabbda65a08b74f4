"""The server's Prometheus metrics (`GET /metrics`, text exposition format).

    r1jax_requests_total{endpoint, status}     responses by endpoint and HTTP status
    r1jax_requests_in_flight                   admitted requests not yet finished
    r1jax_sequences_held / _capacity           sequences admitted (prompts x n), and the most allowed
    r1jax_queue_depth                          sequences waiting for an engine slot
    r1jax_active_slots / r1jax_slots           engine slots decoding, and all of them
    r1jax_generated_tokens_total               tokens sent to clients
    r1jax_tokens_per_second                    generated tokens over the last 10 s, per second
    r1jax_time_to_first_token_seconds          histogram: request admitted -> first token of a sequence
    r1jax_inter_token_latency_seconds          histogram: gap between a sequence's consecutive tokens

One registry per app (not prometheus_client's global one), so several apps in a process (tests)
do not collide. Endpoint labels are the known routes or "other", so a fuzzer's random paths do
not grow the label set.
"""

from __future__ import annotations

import collections
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  re-exported for the app

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
_RATE_WINDOW_S = 10.0


class ServerMetrics:
    def __init__(self, worker, admission):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("r1jax_requests", "Responses by endpoint and HTTP status.", ["endpoint", "status"],
                                registry=r)
        Gauge("r1jax_requests_in_flight", "Admitted requests not yet finished.", registry=r).set_function(
            lambda: admission.requests)
        Gauge("r1jax_sequences_held", "Sequences (prompts x n) admitted and not yet finished.",
              registry=r).set_function(lambda: admission.held)
        Gauge("r1jax_sequences_capacity", "Most sequences held at once (slots + max_waiting).",
              registry=r).set(admission.capacity)
        Gauge("r1jax_queue_depth", "Sequences waiting for an engine slot.", registry=r).set_function(
            lambda: worker.waiting)
        Gauge("r1jax_active_slots", "Engine slots decoding a sequence.", registry=r).set_function(
            lambda: worker.active_slots)
        Gauge("r1jax_slots", "Engine slots.", registry=r).set(worker.engine.slots)
        self.tokens = Counter("r1jax_generated_tokens", "Tokens generated for clients.", registry=r)
        Gauge("r1jax_tokens_per_second", f"Tokens generated over the last {_RATE_WINDOW_S:.0f} s, per second.",
              registry=r).set_function(self._rate)
        self.ttft = Histogram("r1jax_time_to_first_token_seconds", "Request admitted -> a sequence's first token.",
                              registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.inter_token = Histogram("r1jax_inter_token_latency_seconds", "Gap between a sequence's tokens.",
                                     registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def token(self, now: float, first_since: float | None, gap_s: float | None) -> None:
        """One generated token: `first_since` = admission time for a sequence's first token,
        `gap_s` = time since its previous token otherwise."""
        self.tokens.inc()
        if first_since is not None:
            self.ttft.observe(now - first_since)
        if gap_s is not None:
            self.inter_token.observe(gap_s)
        if self._recent and self._recent[-1][0] == round(now, 1):
            self._recent[-1] = (self._recent[-1][0], self._recent[-1][1] + 1)
        else:
            self._recent.append((round(now, 1), 1))

    def _rate(self) -> float:
        cutoff = time.monotonic() - _RATE_WINDOW_S
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / _RATE_WINDOW_S

    def response(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ROUTES else "other", str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
