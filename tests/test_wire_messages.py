"""Topics, JSON messages and binary chunks decode strictly."""

from __future__ import annotations

import json

import pytest

from takfl.wire.errors import MalformedChunk, MalformedMessage, TopicError
from takfl.wire.messages import (
    CHUNK_HEADER_BYTES,
    Ack,
    BlobRef,
    Chunk,
    ChunkRequest,
    GlobalAnnouncement,
    ModelRef,
    Registration,
    Status,
    TaskMessage,
    UpdateHeader,
    WireMessage,
    decode_chunk,
    decode_message,
    encode_chunk,
    encode_message,
)
from takfl.wire.topics import Down, Topics, Up

DIGEST = "0f" * 32
REF = BlobRef(digest=DIGEST, size=300, chunk_size=128, count=3)


def examples() -> list[WireMessage]:
    return [
        Registration(
            agent_id="pi-1",
            prototype="S",
            profile="raspberry-pi-4",
            hardware_class="raspberry-pi",
            num_samples=120,
            sent_at=1.5,
        ),
        TaskMessage(
            round_id=3,
            agent_id="pi-1",
            prototype="S",
            model=ModelRef(builder="mlp_digits", args={"width": 32}),
            num_classes=10,
            input_shape=(1, 8, 8),
            seed=7,
            deadline=1e9,
            compression="int8",
            chunk_size=131072,
            blob=REF,
        ),
        UpdateHeader(
            round_id=3,
            agent_id="pi-1",
            prototype="S",
            base_digest=DIGEST,
            blob=REF,
            compression="fp16",
            num_samples=120,
            metrics={"train_loss": 0.5},
        ),
        ChunkRequest(agent_id="pi-1", digest=DIGEST, missing=[0, 2]),
        Ack(
            subject="update",
            agent_id="pi-1",
            round_id=3,
            digest=DIGEST,
            accepted=False,
            reason="stale_round",
            detail="round 2, current 3",
        ),
        Status(agent_id="pi-1", state="offline", time=2.0),
        GlobalAnnouncement(round_id=3, prototype="S", digest=DIGEST, size=300),
    ]


@pytest.mark.parametrize("msg", examples(), ids=lambda m: type(m).__name__)
def test_messages_round_trip(msg: WireMessage) -> None:
    data = encode_message(msg)
    assert json.loads(data)["protocol"] == "1.0"
    assert decode_message(type(msg), data) == msg


def _mutated(msg: WireMessage, **changes: object) -> bytes:
    fields = json.loads(encode_message(msg))
    fields.update(changes)
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"protocol": "1"}, "protocol"),
        ({"protocol": 1.0}, "protocol"),
        ({"schema": 1}, "schema"),
        ({"extra": 1}, "extra"),
        ({"kind": "task"}, "kind"),
        ({"round_id": -1}, "round_id"),
        ({"round_id": "3"}, "round_id"),
        ({"agent_id": "a/b"}, "agent_id"),
        ({"agent_id": "+"}, "agent_id"),
        ({"base_digest": "XY" * 32}, "base_digest"),
        ({"blob": {"digest": DIGEST, "size": 300, "chunk_size": 128, "count": 2}}, "count"),
        ({"metrics": {"loss": None}}, "metrics"),
        ({"metrics": {f"m{i}": 1.0 for i in range(40)}}, "metrics"),
        ({"compression": "bf16"}, "compression"),
    ],
)
def test_update_header_decoding_is_strict(changes: dict[str, object], where: str) -> None:
    header = examples()[2]
    with pytest.raises(MalformedMessage, match=where):
        decode_message(UpdateHeader, _mutated(header, **changes))


@pytest.mark.parametrize("data", [b"", b"\xff\xfe", b"[]", b"null", b'{"protocol": "1.0"'])
def test_non_json_is_malformed(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_message(Status, data)


def test_oversized_message_is_refused_unread() -> None:
    with pytest.raises(MalformedMessage, match="cap"):
        decode_message(Status, b" " * 70_000)


def test_chunk_round_trip_and_header_size() -> None:
    chunk = Chunk(digest=bytes(range(32)), index=2, count=5, payload=b"payload")
    data = encode_chunk(chunk)
    assert len(data) == CHUNK_HEADER_BYTES + 7
    assert decode_chunk(data) == chunk


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"TKC\x01", "shorter"),
        (b"XXX\x01" + bytes(40), "magic"),
        (b"TKC\x02" + bytes(40), "version"),
        (b"TKC\x01" + bytes(32) + (0).to_bytes(4, "big") + (0).to_bytes(4, "big"), "count"),
        (b"TKC\x01" + bytes(32) + (3).to_bytes(4, "big") + (3).to_bytes(4, "big"), "index"),
    ],
)
def test_malformed_chunks_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(MalformedChunk, match=match):
        decode_chunk(data)


def test_chunk_payload_cap() -> None:
    data = encode_chunk(Chunk(digest=bytes(32), index=0, count=1, payload=b"x" * 10))
    with pytest.raises(MalformedChunk, match="cap"):
        decode_chunk(data, max_payload=9)


def test_topics_build_and_parse() -> None:
    t = Topics("lab")
    assert t.up("pi-1", Up.UPDATE) == "takfl/lab/agent/pi-1/up/update"
    assert t.down("pi-1", Down.TASK) == "takfl/lab/agent/pi-1/down/task"
    assert t.up_filter(Up.CHUNK) == "takfl/lab/agent/+/up/chunk"
    assert t.global_model("S") == "takfl/lab/broadcast/global/S"
    assert t.acl_tree("%u", "up") == "takfl/lab/agent/%u/up/#"
    assert t.agent_of("takfl/lab/agent/pi-1/up/chunk") == "pi-1"
    for bad in (
        "takfl/other/agent/pi-1/up/chunk",
        "takfl/lab/agent/pi-1/sideways/x",
        "takfl/lab/agent/pi-1/up",
        "takfl/lab/broadcast/status",
    ):
        with pytest.raises(TopicError):
            t.agent_of(bad)
    for bad_id in ("a/b", "+", "#", "%u", "", "x" * 65):
        with pytest.raises(TopicError):
            t.up(bad_id, Up.STATUS)
    with pytest.raises(TopicError):
        Topics("a+b")
