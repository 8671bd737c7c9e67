"""Retry bookkeeping of an agent's updates (``edge_agent.retries``), on a stepped clock."""

from __future__ import annotations

import pytest

from edge_agent.retries import UpdateRetries
from takfl.mqtt.retry import RetryPolicy
from takfl.wire.chunking import blob_ref
from takfl.wire.messages import Ack, UpdateHeader

BASE = "ab" * 32


class FakeClocks:
    """A monotonic and a wall clock that move only when told."""

    def __init__(self) -> None:
        self.mono = 100.0
        self.wall = 1_000_000.0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def header(round_id: int, payload: bytes, base: str = BASE) -> UpdateHeader:
    return UpdateHeader(
        round_id=round_id,
        agent_id="a1",
        prototype="s",
        base_digest=base,
        blob=blob_ref(payload, 1024),
        compression="fp16",
        num_samples=10,
    )


def ack_for(h: UpdateHeader) -> Ack:
    """The coordinator's ack of ``h`` (one fixed message: the same stamp every time)."""
    return Ack(
        subject="update",
        agent_id="a1",
        round_id=h.round_id,
        digest=h.blob.digest,
        accepted=True,
        sent_at=0.0,
        nonce=h.blob.digest[:32],
    )


@pytest.fixture
def clocks() -> FakeClocks:
    return FakeClocks()


def book(clocks: FakeClocks, **kw: int) -> UpdateRetries:
    return UpdateRetries(
        retry=RetryPolicy(base_s=10.0, max_s=40.0, jitter=0.0),
        max_answered=kw.get("max_answered", 4),
        memory=kw.get("memory", 8),
        clock=lambda: clocks.mono,
        wall_clock=lambda: clocks.wall,
    )


def test_header_is_due_after_the_ack_timeout_and_not_before(clocks: FakeClocks) -> None:
    # Prepare
    b, h = book(clocks), header(1, b"x")
    b.sent(h, deadline=clocks.wall + 100)
    # Execute / Assert
    clocks.advance(9.9)
    assert b.due() == []
    clocks.advance(0.1)
    assert b.due() == [h]
    assert b.due() == []  # the wait restarted, twice as long
    clocks.advance(19.9)
    assert b.due() == []
    clocks.advance(0.1)
    assert b.due() == [h]
    assert b.retries == 2


def test_waits_double_up_to_the_longest_and_stay_there(clocks: FakeClocks) -> None:
    b, h = book(clocks), header(1, b"x")
    b.sent(h, deadline=clocks.wall + 10_000)
    times = []
    for _ in range(600):
        clocks.advance(1.0)
        if b.due():
            times.append(clocks.mono - 100.0)
    assert times[:6] == [10.0, 30.0, 70.0, 110.0, 150.0, 190.0]  # 10, 20, 40, 40, 40 ...


def test_jitter_stretches_each_wait_and_spreads_a_fleet(clocks: FakeClocks) -> None:
    import random

    books = [
        UpdateRetries(
            retry=RetryPolicy(base_s=10.0, max_s=40.0, jitter=0.25),
            max_answered=1,
            clock=lambda: clocks.mono,
            wall_clock=lambda: clocks.wall,
            rng=random.Random(seed),
        )
        for seed in range(50)
    ]
    h = header(1, b"x")
    for b in books:
        b.sent(h, deadline=clocks.wall + 1000)
    first: list[float] = []
    for _ in range(140):
        clocks.advance(0.1)
        first += [clocks.mono - 100.0 for b in books if b.due()]
    assert len(first) == 50  # every book retried once within 14 s, none before 10 s
    assert min(first) >= 10.0 - 1e-9 and max(first) <= 12.5 + 0.1
    assert max(first) - min(first) > 1.0  # not in step


def test_retry_policy_waits_and_refusals() -> None:
    p = RetryPolicy(base_s=15.0, max_s=120.0, jitter=0.25)
    assert [p.wait_s(n, 0.0) for n in (1, 2, 3, 4, 5, 9)] == [15, 30, 60, 120, 120, 120]
    assert p.wait_s(1, 0.999) == pytest.approx(15 * 1.24975)
    assert p.wait_s(10**6, 0.0) == 120.0  # no overflow
    with pytest.raises(ValueError, match="base_s"):
        RetryPolicy(base_s=0)
    with pytest.raises(ValueError, match="base_s"):
        RetryPolicy(base_s=10, max_s=5)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=-0.1)


def test_ack_stops_retries_and_is_remembered(clocks: FakeClocks) -> None:
    b, h = book(clocks), header(1, b"x")
    b.sent(h, deadline=clocks.wall + 100)
    b.acknowledged(h.blob.digest, ack_for(h))
    clocks.advance(50)
    assert b.due() == []
    assert b.waiting == 0
    assert b.ack(h.blob.digest) == ack_for(h)


def test_header_past_its_deadline_is_dropped_without_retry(clocks: FakeClocks) -> None:
    b, h = book(clocks), header(1, b"x")
    b.sent(h, deadline=clocks.wall + 5)
    clocks.advance(20)
    assert b.due() == []
    assert b.waiting == 0
    assert b.retries == 0


def test_sending_again_forgets_the_previous_ack(clocks: FakeClocks) -> None:
    b, h = book(clocks), header(1, b"x")
    b.sent(h, deadline=clocks.wall + 100)
    b.acknowledged(h.blob.digest, ack_for(h))
    b.sent(h, deadline=clocks.wall + 100)
    assert b.ack(h.blob.digest) is None
    assert b.waiting == 1


def test_repeated_task_is_answered_with_the_same_update_rearmed(clocks: FakeClocks) -> None:
    b, h = book(clocks), header(3, b"x")
    b.sent(h, deadline=clocks.wall + 100)
    b.acknowledged(h.blob.digest, ack_for(h))
    clocks.advance(30)
    # Execute
    again = b.answer_for((3, BASE))
    # Assert: same header, waiting for a fresh ack, due only a full timeout later
    assert again == h
    assert b.ack(h.blob.digest) is None
    assert b.due() == []
    clocks.advance(10)
    assert b.due() == [h]
    assert b.answer_for((4, BASE)) is None


def test_answered_updates_and_acks_are_bounded_oldest_first(clocks: FakeClocks) -> None:
    b = book(clocks, max_answered=2, memory=2)
    hs = [header(r, bytes([r])) for r in range(3)]
    for h in hs:
        b.sent(h, deadline=clocks.wall + 100)
        b.acknowledged(h.blob.digest, ack_for(h))
    assert b.answer_for((0, BASE)) is None
    assert b.answer_for((2, BASE)) == hs[2]
    assert b.ack(hs[1].blob.digest) is not None
    assert b.ack(hs[0].blob.digest) is None


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        UpdateRetries(retry=RetryPolicy(), max_answered=0)
