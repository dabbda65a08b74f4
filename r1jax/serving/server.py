"""Running the app: uvicorn with a graceful SIGTERM, and the refusal to expose a keyless server.

    check_exposure(host, api_key, allow_unauthenticated)     # raises ExposureError
    GracefulServer(uvicorn.Config(app, ...), app.state.admission, grace_s=30).run()

SIGTERM or SIGINT (a pod's preemption notice, Ctrl+C): stop admitting (new requests get 503, and
/health says "draining" so a load balancer moves on), let the admitted requests finish for up to
`grace_s`, then close; the process exits 0. A second signal closes at once. uvicorn's own handler
would instead stop listening at the first signal (new clients get connection errors, not an
answer) and re-raise the signal after shutdown, so the process would end by SIGTERM, not exit 0.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import threading
import time

import uvicorn

from r1jax.serving.admission import Admission

log = logging.getLogger(__name__)


class ExposureError(ValueError):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, api_key: str | None, allow_unauthenticated: bool) -> None:
    """A server bound beyond loopback needs an api_key, unless the user says otherwise."""
    if not api_key and not allow_unauthenticated and not is_loopback(host):
        raise ExposureError(f"host={host} is reachable from other machines and no api_key is set: pass "
                            "api_key=KEY, or allow_unauthenticated=true to serve without one")


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, admission: Admission, grace_s: float = 30.0):
        super().__init__(config)
        self.admission, self.grace_s = admission, grace_s
        self.drain_deadline: float | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # e.g. a test's server thread
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        if self.drain_deadline is not None:  # the second signal: close now
            log.warning("second signal: closing without waiting for %d request(s)", self.admission.requests)
            self.should_exit = self.force_exit = True
            return
        self.drain()

    def drain(self) -> None:
        """Refuse new requests; close once the admitted ones finish or `grace_s` has passed."""
        self.admission.drain()
        self.drain_deadline = time.monotonic() + self.grace_s
        log.info("draining: %d request(s) in flight, closing within %.0f s", self.admission.requests, self.grace_s)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            if self.admission.idle:
                self.should_exit = True
            elif time.monotonic() > self.drain_deadline:
                log.warning("shutdown grace over: closing with %d request(s) unfinished", self.admission.requests)
                self.should_exit = True
        return await super().on_tick(counter)
