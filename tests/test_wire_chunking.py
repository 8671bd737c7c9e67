"""Splitting and reassembling content-addressed blobs."""

from __future__ import annotations

import random

import pytest

from takfl.wire.chunking import Reassembler, ReassemblyLimits, blob_ref, sha256, split
from takfl.wire.errors import BlobTooLarge, ChunkMismatch, DigestMismatch, UnknownBlob
from takfl.wire.messages import BlobRef, Chunk


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def blob_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize("size", [0, 1, 99, 100, 101, 1000, 4096])
@pytest.mark.parametrize("seed", range(3))
def test_shuffled_and_duplicated_chunks_reassemble_exactly(size: int, seed: int) -> None:
    blob = blob_of(size, seed)
    chunks = split(blob, 100)
    assert len(chunks) == max(1, -(-size // 100))
    rng = random.Random(seed)
    stream = chunks + rng.sample(chunks, k=len(chunks) // 2 + 1)
    rng.shuffle(stream)
    r = Reassembler()
    assert r.expect(blob_ref(blob, 100))
    done = [out for c in stream if (out := r.add(c)) is not None]
    assert done == [blob]
    assert r.pending() == []
    assert r.stats.duplicates + r.stats.late == len(stream) - len(chunks)


def test_expect_is_idempotent_while_pending_and_late_chunks_are_ignored() -> None:
    blob = blob_of(250)
    ref = blob_ref(blob, 100)
    r = Reassembler()
    assert r.expect(ref) is True
    assert r.expect(ref) is False
    for c in split(blob, 100):
        r.add(c)
    assert r.add(split(blob, 100)[0]) is None  # late duplicate of a completed blob
    assert r.stats.late == 1
    assert r.expect(ref) is True  # the same blob can be collected again later
    assert r.missing(ref.digest) == [0, 1, 2]


def test_missing_lists_what_has_not_arrived() -> None:
    blob = blob_of(450)
    chunks = split(blob, 100)
    r = Reassembler()
    r.expect(blob_ref(blob, 100))
    for i in (0, 2, 4):
        r.add(chunks[i])
    key = sha256(blob).hex()
    assert r.missing(key) == [1, 3]
    r.add(chunks[1])
    assert r.missing(key) == [3]
    assert r.add(chunks[3]) == blob
    assert r.missing(key) == []


def test_caps_refuse_before_allocating() -> None:
    r = Reassembler(ReassemblyLimits(max_blob_bytes=1 << 20, max_chunks=16))
    # 1 TiB would fail loudly if a buffer were allocated first.
    huge = BlobRef(digest="ab" * 32, size=1 << 40, chunk_size=1 << 24, count=1 << 16)
    with pytest.raises(BlobTooLarge, match="byte cap"):
        r.expect(huge)
    many = BlobRef(digest="cd" * 32, size=1000, chunk_size=10, count=100)
    with pytest.raises(BlobTooLarge, match="chunk cap"):
        r.expect(many)
    assert r.pending() == []


def test_pending_room_is_bounded() -> None:
    r = Reassembler(ReassemblyLimits(max_pending=2, max_pending_bytes=250))
    r.expect(blob_ref(blob_of(100, 1), 50))
    r.expect(blob_ref(blob_of(100, 2), 50))
    with pytest.raises(BlobTooLarge, match="no room"):
        r.expect(blob_ref(blob_of(10, 3), 50))
    r2 = Reassembler(ReassemblyLimits(max_pending=8, max_pending_bytes=250))
    r2.expect(blob_ref(blob_of(200, 1), 50))
    with pytest.raises(BlobTooLarge, match="no room"):
        r2.expect(blob_ref(blob_of(100, 2), 50))


def test_chunks_must_match_their_declaration() -> None:
    blob = blob_of(250)
    ref = blob_ref(blob, 100)
    r = Reassembler()
    r.expect(ref)
    digest = bytes.fromhex(ref.digest)
    with pytest.raises(ChunkMismatch, match="expected 100"):
        r.add(Chunk(digest=digest, index=0, count=3, payload=b"x" * 99))
    with pytest.raises(ChunkMismatch, match="expected 50"):
        r.add(Chunk(digest=digest, index=2, count=3, payload=b"x" * 100))
    with pytest.raises(ChunkMismatch, match="declared 3"):
        r.add(Chunk(digest=digest, index=0, count=4, payload=b"x" * 100))
    with pytest.raises(UnknownBlob):
        r.add(Chunk(digest=b"\x01" * 32, index=0, count=1, payload=b""))
    with pytest.raises(ChunkMismatch, match="different layout"):
        r.expect(blob_ref(blob, 50).model_copy(update={"digest": ref.digest}))


def test_tampered_chunk_fails_the_digest_and_drops_the_blob() -> None:
    blob = blob_of(300)
    chunks = split(blob, 100)
    bad = Chunk(
        digest=chunks[1].digest,
        index=1,
        count=3,
        payload=bytes([chunks[1].payload[0] ^ 1]) + chunks[1].payload[1:],
    )
    r = Reassembler()
    r.expect(blob_ref(blob, 100))
    r.add(chunks[0])
    r.add(bad)
    r.add(chunks[1])  # a genuine duplicate after the tampered one does not repair it
    with pytest.raises(DigestMismatch):
        r.add(chunks[2])
    assert r.pending() == []


def test_incomplete_blobs_time_out() -> None:
    clock = FakeClock()
    r = Reassembler(ReassemblyLimits(timeout_s=10.0), clock=clock)
    blob = blob_of(300)
    chunks = split(blob, 100)
    r.expect(blob_ref(blob, 100))
    r.add(chunks[0])
    clock.now += 8
    r.add(chunks[1])  # progress restarts the clock
    clock.now += 8
    assert r.expire() == []
    assert r.quiet_for(sha256(blob).hex()) == pytest.approx(8)
    clock.now += 3
    assert r.expire() == [sha256(blob).hex()]
    assert r.stats.expired == 1
    with pytest.raises(UnknownBlob):
        r.add(chunks[2])
