"""Retry bookkeeping of an agent's updates (``edge_agent.retries``), on a stepped clock."""

from __future__ import annotations

import pytest

from edge_agent.retries import UpdateRetries
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
        ack_timeout_s=10.0,
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
    assert b.due() == []  # the wait restarted
    clocks.advance(10.0)
    assert b.due() == [h]
    assert b.retries == 2


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
    with pytest.raises(ValueError, match="ack_timeout_s"):
        UpdateRetries(ack_timeout_s=0, max_answered=1)
    with pytest.raises(ValueError, match="at least 1"):
        UpdateRetries(ack_timeout_s=1, max_answered=0)
