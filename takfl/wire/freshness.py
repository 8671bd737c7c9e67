"""Freshness of control messages: a receiver refuses a message sent outside its replay
window or whose nonce it has already seen.

Every JSON message carries ``sent_at`` (unix seconds, the sender's clock) and ``nonce``
(16 random bytes, 32 lower-case hex digits) inside its signed part. A receiver that acts
on it checks, per sender (the agent of the topic, or the coordinator):

1. ``|now - sent_at| <= window_s`` (default 300 s), else ``stale_message``;
2. the nonce was not seen from that sender, else ``replayed``.

Nonces are kept while they could still pass check 1 (``sent_at`` within the window), at
most ``max_nonces`` per sender. When that bound forces the oldest out, its ``sent_at``
becomes the sender's *floor*: anything sent at or before it is refused as
``stale_message`` from then on, so a forgotten nonce can never be replayed.

Check before acting, after the signature verified (so a forgery cannot fill the set).
Pure (an injected clock); thread-safe.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from takfl.wire.reasons import ACCEPTED, Refusal, Verdict, refuse

NONCE_BYTES = 16
NONCE_PATTERN = r"^[0-9a-f]{32}$"
DEFAULT_WINDOW_S = 300.0  # takfl-agent doctor checks the clock against the coordinator's
DEFAULT_MAX_NONCES = 4096  # per sender


def new_nonce() -> str:
    """A fresh nonce: 16 random bytes as 32 lower-case hex digits."""
    return secrets.token_hex(NONCE_BYTES)


@dataclass(frozen=True, kw_only=True)
class FreshnessPolicy:
    window_s: float = DEFAULT_WINDOW_S
    max_nonces: int = DEFAULT_MAX_NONCES  # remembered per sender

    def __post_init__(self) -> None:
        if not self.window_s > 0 or self.max_nonces < 1:
            raise ValueError(f"bad freshness policy {self}")


@dataclass(kw_only=True)
class _Seen:
    nonces: OrderedDict[str, float] = field(default_factory=OrderedDict)  # nonce -> sent_at
    floor: float = float("-inf")


class ReplayGuard:
    """Refuses stale and replayed messages, per sender (see the module docstring)."""

    def __init__(
        self, policy: FreshnessPolicy | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.policy = policy or FreshnessPolicy()
        self.clock = clock
        self._senders: dict[str, _Seen] = {}
        self._lock = threading.Lock()

    def check(self, sender: str, sent_at: float, nonce: str) -> Verdict:
        """Accept (and remember the nonce) or refuse with ``stale_message``/``replayed``."""
        now, window = self.clock(), self.policy.window_s
        if abs(now - sent_at) > window:
            return refuse(
                Refusal.STALE_MESSAGE,
                f"sent {sent_at - now:+.0f} s from now, window +-{window:g} s (check clocks)",
            )
        with self._lock:
            seen = self._senders.setdefault(sender, _Seen())
            self._prune(seen, now - window)
            if sent_at <= seen.floor:
                return refuse(Refusal.STALE_MESSAGE, "older than what this receiver remembers")
            if nonce in seen.nonces:
                return refuse(Refusal.REPLAYED, f"nonce {nonce[:8]}… already seen")
            seen.nonces[nonce] = sent_at
            while len(seen.nonces) > self.policy.max_nonces:
                _, oldest = seen.nonces.popitem(last=False)
                seen.floor = max(seen.floor, oldest)
        return ACCEPTED

    @staticmethod
    def _prune(seen: _Seen, horizon: float) -> None:
        """Forget nonces sent before ``horizon``: the window refuses those already."""
        for nonce, sent_at in list(seen.nonces.items()):
            if sent_at < horizon:
                del seen.nonces[nonce]

    def remembered(self, sender: str) -> int:
        """Nonces kept for ``sender`` now."""
        with self._lock:
            seen = self._senders.get(sender)
            return 0 if seen is None else len(seen.nonces)
