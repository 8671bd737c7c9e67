"""Limits on re-sending blob chunks, so a request cannot make its receiver send much more
than it asked to receive legitimately.

Token buckets, refilled continuously over ``window_s``:

- per requester and blob: re-sent bytes up to ``blob_copies`` times the blob's size;
- per requester: re-sent bytes up to ``requester_bytes`` and at most ``requests``
  requests, whatever the blobs.

A request over a limit is answered with the chunks that still fit (in index order), or
not at all.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ResendLimits:
    window_s: float = 60.0  # buckets refill fully over this long
    blob_copies: float = 2.0  # per requester and blob: this many times the blob, per window
    requester_bytes: int = 64 * 1024 * 1024  # per requester, all blobs, per window
    requests: int = 60  # requests per requester per window
    max_keys: int = 4096  # buckets kept (least recently used dropped first)


UNLIMITED = ResendLimits(blob_copies=float("inf"), requester_bytes=2**62, requests=2**62)


class _Bucket:
    __slots__ = ("capacity", "level", "stamp")

    def __init__(self, capacity: float, now: float) -> None:
        self.capacity = capacity
        self.level = capacity
        self.stamp = now

    def refill(self, now: float, window_s: float) -> None:
        if self.capacity == float("inf"):
            return
        self.level = min(self.capacity, self.level + self.capacity * (now - self.stamp) / window_s)
        self.stamp = now


class ResendLimiter:
    """Decides how much of a chunk request to answer. Thread-safe."""

    def __init__(
        self, limits: ResendLimits | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits or ResendLimits()
        self.clock = clock
        self.refused_requests = 0  # requests answered with nothing
        self.limited_bytes = 0  # bytes asked for and not sent
        self._buckets: OrderedDict[tuple[str, ...], _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def _bucket(self, key: tuple[str, ...], capacity: float, now: float) -> _Bucket:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(capacity, now)
            while len(self._buckets) > self.limits.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            b.refill(now, self.limits.window_s)
        return b

    def allow(self, requester: str, digest: str, blob_size: int, sizes: list[int]) -> int:
        """How many of the requested chunks (``sizes``: their byte sizes, in the order they
        would be sent) may be sent; the allowance is used up by what is allowed."""
        lim = self.limits
        now = self.clock()
        with self._lock:
            count = self._bucket(("requests", requester), float(lim.requests), now)
            if count.level < 1:
                self.refused_requests += 1
                self.limited_bytes += sum(sizes)
                return 0
            count.level -= 1
            per_blob = self._bucket(
                ("blob", requester, digest), lim.blob_copies * max(blob_size, 1), now
            )
            per_requester = self._bucket(("bytes", requester), float(lim.requester_bytes), now)
            budget = min(per_blob.level, per_requester.level)
            n, used = 0, 0
            for size in sizes:
                if used + size > budget:
                    break
                used += size
                n += 1
            per_blob.level -= used
            per_requester.level -= used
            if n == 0 and sizes:
                self.refused_requests += 1
            self.limited_bytes += sum(sizes[n:])
            return n
