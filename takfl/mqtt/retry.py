"""When to send an unanswered message again: exponential backoff with jitter.

Shared by the agent (update headers without an ack) and the coordinator (tasks without an
ack). A fixed interval makes a slow coordinator slower: when it falls behind by more than
the interval, every agent announces again and the backlog grows by the fleet's size. So
the n-th wait is ``min(max_s, base_s * 2**(n-1))``, stretched by a random factor in
``[1, 1 + jitter]`` so that a fleet answered at the same moment does not retry in step.
The first retry never comes before ``base_s``.

Pure: the caller passes the uniform draw, so a test fixes it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    base_s: float = 15.0  # the first wait
    max_s: float = 120.0  # no wait is longer (before jitter)
    jitter: float = 0.25  # each wait is stretched by a factor drawn from [1, 1 + jitter]

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.max_s:
            raise ValueError(
                f"retry waits need 0 < base_s <= max_s, got {self.base_s} and {self.max_s}"
            )
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"retry jitter must be within [0, 1], got {self.jitter}")

    def wait_s(self, sends: int, u: float) -> float:
        """Seconds to wait for an answer after the ``sends``-th send (1-based), with ``u``
        a uniform draw from [0, 1)."""
        doublings = min(max(sends - 1, 0), 30)
        return min(self.max_s, self.base_s * 2.0**doublings) * (1.0 + self.jitter * u)

    def draw(self, sends: int, rng: random.Random) -> float:
        return self.wait_s(sends, rng.random())
