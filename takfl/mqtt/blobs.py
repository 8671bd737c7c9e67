"""Blob transfer over MQTT: chunked sending with a bounded store of recent blobs,
and receiving with reassembly, timeouts and requests for missing chunks.

The sender publishes every chunk once and keeps the blob (bounded by count and
bytes, least recently used first out) to answer :class:`ChunkRequest` s. The
receiver asks again for what is missing after ``quiet_s`` without progress,
and again every ``quiet_s`` while nothing arrives, until the blob completes
or times out.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from takfl.mqtt.client import MqttClient
from takfl.mqtt.ratelimit import ResendLimiter
from takfl.wire.chunking import (
    Reassembler,
    ReassemblyLimits,
    ReassemblyStats,
    blob_ref,
    split,
)
from takfl.wire.errors import BlobTooLarge, UnknownBlob
from takfl.wire.messages import BlobRef, Chunk, ChunkRequest, encode_chunk

REQUEST_BATCH = 1024  # indices asked for in one ChunkRequest


class BlobStore:
    """Recently sent blobs, to answer chunk requests. Thread-safe.

    Chunks are kept encoded (header + payload): a global model sent to N agents is
    encoded once, and every publish shares the same bytes objects.
    """

    def __init__(self, max_blobs: int = 16, max_bytes: int = 2 * 1024**3) -> None:
        self.max_blobs = max_blobs
        self.max_bytes = max_bytes
        self._blobs: OrderedDict[str, tuple[BlobRef, list[Chunk], list[bytes]]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, blob: bytes, chunk_size: int) -> BlobRef:
        """Keep ``blob`` (split into ``chunk_size`` chunks); returns its announcement."""
        ref = blob_ref(blob, chunk_size)
        with self._lock:
            if ref.digest in self._blobs and self._blobs[ref.digest][0] == ref:
                self._blobs.move_to_end(ref.digest)
                return ref
            parts = split(blob, chunk_size)
            self._blobs[ref.digest] = (ref, parts, [encode_chunk(c) for c in parts])
            self._evict()
        return ref

    def _evict(self) -> None:
        total = sum(entry[0].size for entry in self._blobs.values())
        while len(self._blobs) > 1 and (
            len(self._blobs) > self.max_blobs or total > self.max_bytes
        ):
            _, (ref, _, _) = self._blobs.popitem(last=False)
            total -= ref.size

    def _select(self, digest: str, indices: Iterable[int] | None, which: int) -> list[Any]:
        with self._lock:
            entry = self._blobs.get(digest)
            if entry is None:
                return []
            self._blobs.move_to_end(digest)
            items: list[Any] = entry[which]  # type: ignore[assignment]
        if indices is None:
            return list(items)
        return [items[i] for i in sorted(set(indices)) if 0 <= i < len(items)]

    def chunks(self, digest: str, indices: Iterable[int] | None = None) -> list[Chunk]:
        """The stored chunks of ``digest`` (all, or those at ``indices``); [] if unknown."""
        return self._select(digest, indices, 1)

    def encoded(self, digest: str, indices: Iterable[int] | None = None) -> list[bytes]:
        """The same chunks as wire bytes, encoded once when the blob was stored."""
        return self._select(digest, indices, 2)

    def ref(self, digest: str) -> BlobRef | None:
        """The announcement of a kept blob, or None."""
        with self._lock:
            entry = self._blobs.get(digest)
            return None if entry is None else entry[0]

    def __contains__(self, digest: object) -> bool:
        with self._lock:
            return digest in self._blobs


class BlobSender:
    """Publishes blobs as chunks and answers requests from its store, within the limits
    of its :class:`ResendLimiter`."""

    def __init__(
        self,
        client: MqttClient,
        store: BlobStore | None = None,
        limiter: ResendLimiter | None = None,
    ) -> None:
        self.client = client
        self.store = store or BlobStore()
        self.limiter = limiter or ResendLimiter()
        self.resent = 0
        self.resent_bytes = 0

    def keep(self, blob: bytes, chunk_size: int) -> BlobRef:
        """Store ``blob`` without publishing it (it can then be sent or requested)."""
        return self.store.put(blob, chunk_size)

    def publish(self, topic: str, digest: str, indices: Iterable[int] | None = None) -> int:
        """Publish stored chunks of ``digest`` on ``topic``; returns how many went out."""
        sent = 0
        for payload in self.store.encoded(digest, indices):
            sent += int(self.client.publish(topic, payload))
        return sent

    def send(self, topic: str, blob: bytes, chunk_size: int) -> BlobRef:
        """Store and publish every chunk of ``blob``."""
        ref = self.keep(blob, chunk_size)
        self.publish(topic, ref.digest)
        return ref

    def answer(self, topic: str, request: ChunkRequest, requester: str) -> int:
        """Publish the chunks ``requester`` asked for again, as far as the limiter allows
        (0 if the blob is not kept); returns how many went out."""
        ref = self.store.ref(request.digest)
        if ref is None:
            return 0
        encoded = self.store.encoded(request.digest, request.missing)
        allowed = self.limiter.allow(requester, ref.digest, ref.size, [len(e) for e in encoded])
        sent = 0
        for payload in encoded[:allowed]:
            if self.client.publish(topic, payload):
                sent += 1
                self.resent_bytes += len(payload)
        self.resent += sent
        return sent


@dataclass
class _Asked:
    last: float


@dataclass(frozen=True)
class Missing:
    """Chunks of ``digest`` from ``source`` still missing (at most REQUEST_BATCH)."""

    source: str
    digest: str
    indices: list[int]


class BlobReceiver:
    """Reassembles blobs from several sources (one reassembler each). Not thread-safe:
    use it from the dispatcher thread only.

    ``source`` names who sends the blob (an agent id, or "coordinator"): chunks are
    matched to blobs declared for the same source, and requests go back to it.
    """

    def __init__(
        self,
        limits: ReassemblyLimits | None = None,
        *,
        quiet_s: float = 5.0,
        max_total_bytes: int = 2 * 1024**3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits or ReassemblyLimits()
        self.quiet_s = quiet_s
        self.max_total_bytes = max_total_bytes
        self.clock = clock
        self._by_source: dict[str, Reassembler] = {}
        self._asked: dict[tuple[str, str], _Asked] = {}
        self._sizes: dict[tuple[str, str], int] = {}

    def _reassembler(self, source: str) -> Reassembler:
        r = self._by_source.get(source)
        if r is None:
            r = self._by_source[source] = Reassembler(self.limits, self.clock)
        return r

    def expect(self, source: str, ref: BlobRef) -> bool:
        """Declare a blob from ``source``; False if already pending.

        Raises :class:`BlobTooLarge` (caps, or the total across sources) and
        :class:`ChunkMismatch` (same digest declared differently).
        """
        r = self._reassembler(source)
        if r.is_pending(ref.digest):
            return r.expect(ref)
        r.check_ref(ref)
        reserved = sum(self._sizes.values())
        if reserved + ref.size > self.max_total_bytes:
            raise BlobTooLarge(f"no room for {ref.size} more bytes ({reserved} reserved)")
        r.expect(ref)
        self._sizes[(source, ref.digest)] = ref.size
        self._asked[(source, ref.digest)] = _Asked(self.clock())
        return True

    def add(self, source: str, chunk: Chunk) -> bytes | None:
        """Store a chunk; the verified blob when complete. Raises like ``Reassembler.add``
        (a failed digest drops the blob)."""
        r = self._by_source.get(source)
        if r is None:
            raise UnknownBlob(f"no blob expected from {source!r}")
        key = (source, chunk.hex_digest)
        try:
            blob = r.add(chunk)
        except Exception:
            if not r.is_pending(chunk.hex_digest):
                self._forget(key)
            raise
        if blob is not None:
            self._forget(key)
        return blob

    def _forget(self, key: tuple[str, str]) -> None:
        self._asked.pop(key, None)
        self._sizes.pop(key, None)

    def discard(self, source: str, digest: str) -> None:
        r = self._by_source.get(source)
        if r is not None:
            r.discard(digest)
        self._forget((source, digest))

    def is_pending(self, source: str, digest: str) -> bool:
        r = self._by_source.get(source)
        return r is not None and r.is_pending(digest)

    def stats(self, source: str) -> ReassemblyStats | None:
        """Counters of the reassembler for ``source`` (None if nothing came from it)."""
        r = self._by_source.get(source)
        return None if r is None else r.stats

    def missing(self, source: str, digest: str) -> list[int]:
        r = self._by_source.get(source)
        return [] if r is None else r.missing(digest)

    def due_requests(self) -> list[Missing]:
        """What to ask for again: blobs quiet for ``quiet_s`` (and not asked for in the last
        ``quiet_s``). The caller turns each into a signed :class:`ChunkRequest`."""
        now = self.clock()
        out = []
        for (source, digest), asked in self._asked.items():
            r = self._by_source[source]
            if r.quiet_for(digest) < self.quiet_s or now - asked.last < self.quiet_s:
                continue
            missing = r.missing(digest)
            if missing:
                asked.last = now
                out.append(Missing(source, digest, missing[:REQUEST_BATCH]))
        return out

    def expire(self) -> list[tuple[str, str]]:
        """Drop blobs with no progress for ``limits.timeout_s``; returns (source, digest)."""
        dead = []
        for source, r in self._by_source.items():
            for digest in r.expire():
                self._forget((source, digest))
                dead.append((source, digest))
        return dead
