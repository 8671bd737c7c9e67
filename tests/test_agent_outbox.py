"""The agent's sent updates (``edge_agent.outbox``) without a broker: a fake client
records what is published, on a stepped clock."""

from __future__ import annotations

import time
from typing import Any, cast

import torch

from edge_agent.outbox import UpdateOutbox
from takfl.mqtt.client import MqttClient
from takfl.mqtt.ratelimit import UNLIMITED
from takfl.wire.chunking import blob_ref
from takfl.wire.codec import encode_state
from takfl.wire.messages import (
    Ack,
    ChunkRequest,
    ModelRef,
    TaskMessage,
    UpdateHeader,
    decode_chunk,
    decode_message,
)
from takfl.wire.signing import generate_secret, sign, verify
from takfl.wire.topics import Topics, Up
from takfl.wire.update import PreparedUpdate, prepare_update

CHUNK = 256
SECRET = generate_secret()
TOPICS = Topics("unit")
UPDATE, CHUNKS = TOPICS.up("a1", Up.UPDATE), TOPICS.up("a1", Up.CHUNK)


class FakeClient:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        self.sent.append((topic, payload))
        return True

    def take(self) -> list[tuple[str, bytes]]:
        sent, self.sent = self.sent, []
        return sent


class Clocks:
    def __init__(self) -> None:
        self.mono, self.wall = 100.0, time.time()

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def prepared(round_id: int = 1) -> PreparedUpdate:
    state = {"w": torch.randn(16, 8, generator=torch.Generator().manual_seed(0))}
    task = sign(
        TaskMessage(
            round_id=round_id,
            agent_id="a1",
            prototype="S",
            model=ModelRef(builder="mlp_digits"),
            num_classes=10,
            input_shape=(1, 8, 8),
            seed=1,
            deadline=time.time() + 600,
            compression="fp32",
            chunk_size=CHUNK,
            blob=blob_ref(encode_state(state, "fp32"), CHUNK),
        ),
        SECRET,
    )
    trained = {k: v + 0.5 for k, v in state.items()}
    return prepare_update(task, trained, state, secret=SECRET, num_samples=3)


def outbox(client: FakeClient, clocks: Clocks, **kw: Any) -> UpdateOutbox:
    return UpdateOutbox(
        cast(MqttClient, client),
        TOPICS,
        "a1",
        secret=SECRET,
        ack_timeout_s=kw.get("ack_timeout_s", 15.0),
        max_sent_blobs=2,
        resend=UNLIMITED,
        clock=lambda: clocks.mono,
        wall_clock=lambda: clocks.wall,
    )


def ack(up: PreparedUpdate) -> Ack:
    """The coordinator's ack of ``up`` (one fixed message: the same stamp every time)."""
    h = up.header
    return Ack(
        subject="update",
        agent_id="a1",
        round_id=1,
        digest=h.blob.digest,
        accepted=True,
        sent_at=0.0,
        nonce=h.blob.digest[:32],
    )


def test_an_update_goes_out_as_its_header_then_its_chunks() -> None:
    # Prepare
    client, clocks = FakeClient(), Clocks()
    up = prepared()
    # Execute
    outbox(client, clocks).send(up, time.time() + 60, None)
    # Assert
    sent = client.take()
    assert sent[0][0] == UPDATE
    # each send is stamped afresh (sent_at, nonce, signature); the content is the header's
    fresh = {"sent_at", "nonce", "signature"}
    sent_header = decode_message(UpdateHeader, sent[0][1])
    assert sent_header.model_dump(exclude=fresh) == up.header.model_dump(exclude=fresh)
    assert [t for t, _ in sent[1:]] == [CHUNKS] * up.header.blob.count
    assert b"".join(decode_chunk(p).payload for _, p in sent[1:]) == up.blob


def test_a_header_is_announced_again_until_acknowledged() -> None:
    # Prepare
    client, clocks = FakeClient(), Clocks()
    box = outbox(client, clocks, ack_timeout_s=15.0)
    up = prepared()
    box.send(up, clocks.wall + 600, [])
    client.take()
    # Execute / Assert
    clocks.advance(14.0)
    box.retry_due()
    assert client.take() == []
    clocks.advance(1.0)
    box.retry_due()
    assert [t for t, _ in client.take()] == [UPDATE] and box.header_retries == 1
    box.acknowledged(up.header.blob.digest, ack(up))
    clocks.advance(60.0)
    box.retry_due()
    assert client.take() == [] and box.header_retries == 1
    assert box.wait_ack(up.header.blob.digest, timeout=0.0) == ack(up)


def test_wait_ack_gives_up_after_its_timeout() -> None:
    box = outbox(FakeClient(), Clocks())
    assert box.wait_ack("ab" * 32, timeout=0.0) is None


def test_a_repeated_task_gets_the_same_update_again() -> None:
    # Prepare
    client, clocks = FakeClient(), Clocks()
    box = outbox(client, clocks)
    up = prepared(round_id=4)
    box.send(up, clocks.wall + 600, None)
    first = client.take()
    # Execute
    box.answer_again((4, up.header.base_digest))
    box.answer_again((5, up.header.base_digest))  # a task never answered: nothing to send
    # Assert: the same update (a fresh stamp: a receiver refuses a nonce seen before)
    again = client.take()
    assert [t for t, _ in again] == [t for t, _ in first]
    old, new = (decode_message(UpdateHeader, sent[0][1]) for sent in (first, again))
    assert new.content_ref() == old.content_ref() and new.nonce != old.nonce
    assert verify(new, SECRET)
    assert again[1:] == first[1:]


def test_chunk_requests_are_answered_from_the_kept_blob() -> None:
    # Prepare
    client, clocks = FakeClient(), Clocks()
    box = outbox(client, clocks)
    up = prepared()
    box.send(up, clocks.wall + 600, [])
    client.take()
    digest = up.header.blob.digest
    # Execute
    box.answer(sign(ChunkRequest(agent_id="a1", digest=digest, missing=[1]), SECRET), "c")
    box.answer(sign(ChunkRequest(agent_id="a1", digest="cd" * 32, missing=[0]), SECRET), "c")
    # Assert: the one chunk asked for; a blob not kept answers nothing
    (sent,) = client.take()
    assert sent[0] == CHUNKS and decode_chunk(sent[1]).index == 1
    assert box.requests_answered == 1
