"""Limits on re-sending blob chunks, so a request cannot make its receiver send much more
than it asked to receive legitimately.

Token buckets, refilled continuously over ``window_s``:

- per requester and blob: re-sent bytes up to ``blob_copies`` times the blob's size;
- per requester: re-sent bytes up to ``requester_bytes`` and at most ``requests``
  requests, whatever the blobs.

A request over a limit is answered with the chunks that still fit (in index order), or
not at all.

:class:`MessageLimiter` is the same bucket for whole messages (registrations, statuses):
one per agent, the excess dropped before any work is done on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ResendLimits:
    window_s: float = 60.0  # buckets refill fully over this long
    blob_copies: float = 2.0  # per requester and blob: this many times the blob, per window
    requester_bytes: int = 64 * 1024 * 1024  # per requester, all blobs, per window
    requests: int = 60  # requests per requester per window
    max_keys: int = 4096  # buckets kept (least recently used dropped first)


L = TypeVar("L", "ResendLimits", "MessageLimits")


def with_room_for(limits: L, keys: int) -> L:
    """``limits`` keeping at least ``keys`` buckets: a limiter keyed by agent must hold
    one bucket per agent of the fleet (a bucket dropped to make room comes back full,
    so a fleet larger than ``max_keys`` would have its limits forgotten in turn)."""
    return limits if limits.max_keys >= keys else replace(limits, max_keys=keys)


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


@dataclass(frozen=True, kw_only=True)
class MessageLimits:
    """A token bucket per key (e.g. an agent and a kind of message): ``per_window``
    messages, refilled continuously over ``window_s``."""

    window_s: float = 60.0
    per_window: float = 10.0
    max_keys: int = 4096  # buckets kept (least recently used dropped first)


class MessageLimiter:
    """Admits messages per key up to its :class:`MessageLimits`; the rest are dropped,
    counted per key, and logged once per key and window (with how many were dropped).
    Thread-safe: it may run on a network thread before a message is queued."""

    def __init__(
        self,
        name: str,
        limits: MessageLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name  # what is limited, for the log ("registrations", ...)
        self.limits = limits or MessageLimits()
        self.clock = clock
        self.dropped: Counter[str] = Counter()  # key -> messages dropped
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._logged: dict[str, tuple[float, int]] = {}  # key -> (window start, dropped then)
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """True if a message of ``key`` may go on now (its bucket loses a token)."""
        lim = self.limits
        now = self.clock()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                b = self._buckets[key] = _Bucket(float(lim.per_window), now)
                while len(self._buckets) > lim.max_keys:
                    old, _ = self._buckets.popitem(last=False)
                    self._logged.pop(old, None)
            else:
                self._buckets.move_to_end(key)
                b.refill(now, lim.window_s)
            if b.level >= 1:
                b.level -= 1
                return True
            self.dropped[key] += 1
            since, count = self._logged.get(key, (-float("inf"), 0))
            due = now - since >= lim.window_s
            if due:
                self._logged[key] = (now, self.dropped[key])
        if due:
            log.warning(
                "%s from %s over %g per %gs: dropping them (%d dropped in the last window)",
                self.name,
                key,
                lim.per_window,
                lim.window_s,
                self.dropped[key] - count,
            )
        return False

    @property
    def total_dropped(self) -> int:
        with self._lock:
            return sum(self.dropped.values())
