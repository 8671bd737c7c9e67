"""Retry bookkeeping of an agent's updates: which headers still wait for an ack, which
are due to be announced again, and which update answers a repeated task.

No network and no threads here: the link calls these methods under its own lock and
publishes what they return. Both clocks are injected, so a test can step time::

    book = UpdateRetries(ack_timeout_s=15.0, clock=fake.monotonic, wall_clock=fake.time)
    book.sent(header, deadline=task.deadline)
    fake.advance(15.0)
    book.due()            # -> [header]: announce it again
    book.acknowledged(header.blob.digest, ack)
    book.due()            # -> []
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from takfl.wire.messages import Ack, UpdateHeader

MEMORY = 256  # acks remembered (oldest forgotten first)


@dataclass
class _Outgoing:
    header: UpdateHeader
    last_sent: float  # injected monotonic clock
    deadline: float  # unix time (the task's deadline)


class UpdateRetries:
    """Unacknowledged update headers, the acks received, and the updates already sent
    per task (``(round id, global digest)``), bounded in memory. Not thread-safe."""

    def __init__(
        self,
        *,
        ack_timeout_s: float,
        max_answered: int,
        memory: int = MEMORY,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if ack_timeout_s <= 0:
            raise ValueError(f"ack_timeout_s must be > 0, got {ack_timeout_s}")
        if max_answered < 1 or memory < 1:
            raise ValueError("max_answered and memory must be at least 1")
        self.ack_timeout_s = ack_timeout_s
        self.max_answered = max_answered
        self.memory = memory
        self.clock = clock
        self.wall_clock = wall_clock
        self.retries = 0  # headers handed out again by due()
        self._outgoing: dict[str, _Outgoing] = {}  # blob digest -> waiting for its ack
        self._answered: OrderedDict[tuple[int, str], tuple[UpdateHeader, float]] = OrderedDict()
        self._acks: OrderedDict[str, Ack] = OrderedDict()

    def sent(self, header: UpdateHeader, deadline: float) -> None:
        """Record that ``header`` was just published; it answers its task from now on and
        is due again after ``ack_timeout_s`` without an ack, until ``deadline`` (unix)."""
        digest = header.blob.digest
        self._acks.pop(digest, None)  # an ack is awaited for this send
        self._outgoing[digest] = _Outgoing(header, self.clock(), deadline)
        self._answered[(header.round_id, header.base_digest)] = (header, deadline)
        self._answered.move_to_end((header.round_id, header.base_digest))
        while len(self._answered) > self.max_answered:
            self._answered.popitem(last=False)

    def answer_for(self, task_key: tuple[int, str]) -> UpdateHeader | None:
        """The update already sent for a task repeated with this ``(round, global digest)``,
        re-armed as if just sent (its old ack forgotten); None if none is remembered."""
        answered = self._answered.get(task_key)
        if answered is None:
            return None
        header, deadline = answered
        self._acks.pop(header.blob.digest, None)
        self._outgoing[header.blob.digest] = _Outgoing(header, self.clock(), deadline)
        return header

    def acknowledged(self, key: str, ack: Ack) -> None:
        """The coordinator answered ``key`` (a blob digest or the registration key)."""
        self._outgoing.pop(key, None)
        self._acks[key] = ack
        self._acks.move_to_end(key)
        while len(self._acks) > self.memory:
            self._acks.popitem(last=False)

    def ack(self, key: str) -> Ack | None:
        return self._acks.get(key)

    def run_of(self, digest: str) -> str | None:
        """The run of the update whose blob is ``digest`` (None: not one this book holds)."""
        out = self._outgoing.get(digest)
        if out is not None:
            return out.header.run
        for header, _ in self._answered.values():
            if header.blob.digest == digest:
                return header.run
        return None

    def due(self) -> list[UpdateHeader]:
        """Headers to announce again now (each restarts its wait); those past their
        deadline are dropped without a retry."""
        now, wall = self.clock(), self.wall_clock()
        due: list[UpdateHeader] = []
        for digest, out in list(self._outgoing.items()):
            if wall > out.deadline:
                del self._outgoing[digest]
            elif now - out.last_sent >= self.ack_timeout_s:
                out.last_sent = now
                due.append(out.header)
        self.retries += len(due)
        return due

    @property
    def waiting(self) -> int:
        """Headers sent and not yet acknowledged nor expired."""
        return len(self._outgoing)
