"""A captured chunk request replayed later (the attack of issue 19's item 6: a program
chunk request recorded at a site broker and replayed 25-107 s later was answered again)
is refused by the coordinator's reader before anything answers it: ``replayed`` inside
the freshness window, ``stale_message`` after it."""

from __future__ import annotations

from coordinator.transport.inbound import read
from takfl.wire.envelope import new_run_id
from takfl.wire.freshness import FreshnessPolicy, ReplayGuard
from takfl.wire.messages import ChunkRequest, encode_message
from takfl.wire.signing import generate_secret, sign
from takfl.wire.topics import Topics, Up
from takfl.wire.validation import AgentRecord, Refusal

SECRET = generate_secret()
RUN = new_run_id()
TOPICS = Topics("fleet")
REGISTRY = {"a1": AgentRecord(agent_id="a1", prototype="S", secret=SECRET)}
TOPIC = TOPICS.up("a1", Up.REQUEST)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def captured(sent_at: float) -> bytes:
    """A chunk request a1 signed at ``sent_at``, as a listener on the broker recorded it."""
    request = ChunkRequest(
        run=RUN, sent_at=sent_at, agent_id="a1", digest="ab" * 32, missing=[0, 3]
    )
    return encode_message(sign(request, SECRET))


def test_a_replayed_chunk_request_is_refused_inside_the_window_and_after_it() -> None:
    # Prepare: the coordinator's guard, a request captured when it was sent
    clock = Clock(1_000_000.0)
    guard = ReplayGuard(FreshnessPolicy(), clock=clock)
    payload = captured(clock.now)
    # Execute: the genuine delivery, a replay 25 s later, one after the window
    first = read(ChunkRequest, TOPICS, TOPIC, payload, REGISTRY, guard=guard)
    clock.now += 25
    replay = read(ChunkRequest, TOPICS, TOPIC, payload, REGISTRY, guard=guard)
    clock.now += FreshnessPolicy().window_s + 60
    late = read(ChunkRequest, TOPICS, TOPIC, payload, REGISTRY, guard=guard)
    # Assert
    assert first.ok and first.message is not None and first.message.missing == [0, 3]
    assert not replay.ok and replay.verdict.reason is Refusal.REPLAYED
    assert not late.ok and late.verdict.reason is Refusal.STALE_MESSAGE


def test_a_fresh_request_with_a_new_nonce_is_answered() -> None:
    clock = Clock(2_000_000.0)
    guard = ReplayGuard(FreshnessPolicy(), clock=clock)
    for step in range(3):  # an agent asking again signs a new request each time
        clock.now += 30
        got = read(ChunkRequest, TOPICS, TOPIC, captured(clock.now), REGISTRY, guard=guard)
        assert got.ok, (step, got.verdict)
