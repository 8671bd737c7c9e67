"""Inference telemetry of the local service: what it reports with the agent's status."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from takfl.release.reference import percentiles_ms
from takfl.wire.messages import InferenceStatus

WINDOW = 2048  # latencies of the most recent successful predictions kept for p50/p99


class InferenceStats:
    """Counts prediction requests and errors since the service started, and keeps the
    latency of the last ``window`` successful ones. Thread-safe."""

    def __init__(self, window: int = WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=window)
        self.requests = 0
        self.errors = 0

    def record(self, seconds: float, *, ok: bool) -> None:
        """One prediction request that took ``seconds`` (received to answer ready);
        ``ok`` False for a refused or failed one (its time is not kept)."""
        with self._lock:
            self.requests += 1
            if ok:
                self._latencies.append(seconds)
            else:
                self.errors += 1

    def status(self, active_version: int | None) -> InferenceStatus:
        """The block that goes on the agent's status."""
        with self._lock:
            requests, errors, latencies = self.requests, self.errors, list(self._latencies)
        p50, p99 = percentiles_ms(latencies) if latencies else (None, None)
        return InferenceStatus(
            requests=requests,
            errors=errors,
            latency_p50_ms=p50,
            latency_p99_ms=p99,
            active_version=active_version,
        )


class StatusSchedule:
    """When the agent publishes its status again for the sake of its inference block:
    when the block changed, and at most every ``every_s`` seconds."""

    def __init__(
        self, every_s: float = 30.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.every_s = every_s
        self.clock = clock
        self._last: InferenceStatus | None = None
        self._at = -float("inf")

    def sent(self, status: InferenceStatus) -> None:
        """``status`` went out now (e.g. with the ``online`` status on a connect)."""
        self._last, self._at = status, self.clock()

    def due(self, status: InferenceStatus) -> bool:
        """True if ``status`` should go out now (then call :meth:`sent`)."""
        return status != self._last and self.clock() - self._at >= self.every_s
