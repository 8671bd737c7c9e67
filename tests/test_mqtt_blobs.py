"""Blob store and receiver logic (no network): eviction, requests after quiet periods,
timeouts, per-source separation."""

from __future__ import annotations

import random

import pytest

from takfl.mqtt.blobs import BlobReceiver, BlobStore
from takfl.wire.chunking import ReassemblyLimits, blob_ref, split
from takfl.wire.errors import BlobTooLarge, UnknownBlob


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def blob_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def test_store_evicts_oldest_by_count_and_bytes() -> None:
    store = BlobStore(max_blobs=2, max_bytes=250)
    a, b, c = (store.put(blob_of(100, i), 40) for i in range(3))
    assert a.digest not in store and b.digest in store and c.digest in store
    assert [x.index for x in store.chunks(b.digest, [2, 0, 2, 99])] == [0, 2]
    d = store.put(blob_of(200, 9), 40)  # 3 blobs: b goes; 300 bytes with c: c goes
    assert b.digest not in store and c.digest not in store and d.digest in store
    assert store.chunks(b.digest) == []


def test_receiver_asks_for_missing_chunks_after_quiet_periods() -> None:
    clock = FakeClock()
    rx = BlobReceiver(ReassemblyLimits(timeout_s=60), quiet_s=2.0, clock=clock)
    blob = blob_of(500)
    ref = blob_ref(blob, 100)
    chunks = split(blob, 100)
    assert rx.expect("a1", ref)
    assert not rx.expect("a1", ref)
    rx.add("a1", chunks[0])
    rx.add("a1", chunks[3])
    clock.now = 1.9
    assert rx.due_requests() == []
    clock.now = 2.1
    [due] = rx.due_requests()
    assert (due.source, due.digest, due.indices) == ("a1", ref.digest, [1, 2, 4])
    clock.now = 3.0
    assert rx.due_requests() == []  # asked less than quiet_s ago
    clock.now = 4.2
    assert len(rx.due_requests()) == 1  # still nothing: ask again
    rx.add("a1", chunks[1])
    clock.now = 5.0
    assert rx.due_requests() == []  # progress restarts the quiet period
    rx.add("a1", chunks[2])
    assert rx.add("a1", chunks[4]) == blob
    clock.now = 100.0
    assert rx.due_requests() == [] and rx.expire() == []


def test_receiver_expires_and_separates_sources() -> None:
    clock = FakeClock()
    rx = BlobReceiver(ReassemblyLimits(timeout_s=10), quiet_s=1.0, clock=clock)
    blob = blob_of(300)
    ref = blob_ref(blob, 100)
    rx.expect("a1", ref)
    rx.expect("a2", ref)
    chunks = split(blob, 100)
    for c in chunks:
        rx.add("a1", c)
    assert rx.missing("a2", ref.digest) == [0, 1, 2]
    with pytest.raises(UnknownBlob):
        rx.add("a3", chunks[0])
    clock.now = 11.0
    assert rx.expire() == [("a2", ref.digest)]
    assert not rx.is_pending("a2", ref.digest)


def test_receiver_caps_total_reserved_bytes() -> None:
    rx = BlobReceiver(ReassemblyLimits(), quiet_s=1.0, max_total_bytes=500)
    rx.expect("a1", blob_ref(blob_of(300, 1), 100))
    with pytest.raises(BlobTooLarge, match="no room"):
        rx.expect("a2", blob_ref(blob_of(300, 2), 100))
    rx.discard("a1", blob_ref(blob_of(300, 1), 100).digest)
    assert rx.expect("a2", blob_ref(blob_of(300, 2), 100))
