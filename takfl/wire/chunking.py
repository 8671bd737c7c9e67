"""Content-addressed blobs: splitting into chunks and reassembling them safely.

A blob is named by its SHA-256. The sender announces a :class:`BlobRef`
(digest, size, chunk size, count) and publishes the chunks; the receiver's
:class:`Reassembler` accepts them in any order and any number of times, checks
every chunk against the declaration, verifies the digest of the assembled
blob, drops blobs that stay incomplete past a timeout, and says which indices
are still missing so they can be asked for again.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from takfl.wire.errors import BlobTooLarge, ChunkMismatch, DigestMismatch, UnknownBlob
from takfl.wire.messages import BlobRef, Chunk, chunk_count


def sha256(blob: bytes) -> bytes:
    """The 32-byte SHA-256 digest of ``blob``."""
    return hashlib.sha256(blob).digest()


def blob_ref(blob: bytes, chunk_size: int) -> BlobRef:
    """The announcement of ``blob`` split into ``chunk_size``-byte chunks."""
    return BlobRef(
        digest=sha256(blob).hex(),
        size=len(blob),
        chunk_size=chunk_size,
        count=chunk_count(len(blob), chunk_size),
    )


def split(blob: bytes, chunk_size: int) -> list[Chunk]:
    """Split ``blob`` into chunks of ``chunk_size`` bytes (the last may be shorter).

    An empty blob gives one empty chunk, so every blob has at least one.
    """
    digest = sha256(blob)
    count = chunk_count(len(blob), chunk_size)
    view = memoryview(blob)
    return [
        Chunk(
            digest=digest,
            index=i,
            count=count,
            payload=bytes(view[i * chunk_size : (i + 1) * chunk_size]),
        )
        for i in range(count)
    ]


def expected_length(ref: BlobRef, index: int) -> int:
    """Payload length chunk ``index`` of ``ref`` must have."""
    if index < ref.count - 1:
        return ref.chunk_size
    return ref.size - (ref.count - 1) * ref.chunk_size


@dataclass(frozen=True, kw_only=True)
class ReassemblyLimits:
    """Caps applied before any buffer is allocated."""

    max_blob_bytes: int = 256 * 1024 * 1024  # one blob
    max_chunks: int = 1 << 16  # chunks of one blob
    max_pending: int = 32  # blobs being assembled at once
    max_pending_bytes: int = 1024 * 1024 * 1024  # bytes reserved across pending blobs
    timeout_s: float = 300.0  # drop a blob this long after its last progress
    remember_completed: int = 256  # completed digests kept to tell late duplicates apart


@dataclass(kw_only=True)
class _Pending:
    ref: BlobRef
    buffer: bytearray
    received: bytearray  # one flag per chunk
    remaining: int
    last_progress: float
    duplicates: int = 0


@dataclass(kw_only=True)
class ReassemblyStats:
    completed: int = 0
    duplicates: int = 0
    late: int = 0  # chunks of blobs already completed
    expired: int = 0
    refused: int = 0


class Reassembler:
    """Collects chunks of declared blobs. Not thread-safe: use it from one thread.

    Usage: ``expect(ref)`` once per blob (idempotent), then ``add(chunk)`` for
    every chunk received; ``add`` returns the verified blob when it completes.
    """

    def __init__(
        self, limits: ReassemblyLimits | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits or ReassemblyLimits()
        self.clock = clock
        self._pending: dict[str, _Pending] = {}
        self._completed: OrderedDict[str, None] = OrderedDict()
        self.stats = ReassemblyStats()

    # -- declaration --------------------------------------------------------------
    def check_ref(self, ref: BlobRef) -> None:
        """Raise :class:`BlobTooLarge` if ``ref`` exceeds a cap (nothing is allocated)."""
        lim = self.limits
        if ref.size > lim.max_blob_bytes:
            raise BlobTooLarge(
                f"blob of {ref.size} bytes exceeds the {lim.max_blob_bytes}-byte cap"
            )
        if ref.count > lim.max_chunks:
            raise BlobTooLarge(f"blob of {ref.count} chunks exceeds the {lim.max_chunks}-chunk cap")

    def expect(self, ref: BlobRef) -> bool:
        """Declare a blob. Returns False if it is already pending.

        A blob completed earlier can be declared again (e.g. the same global model
        sent in a later round): it is then collected anew.

        Raises:
            BlobTooLarge: over a cap, or no room left among pending blobs.
            ChunkMismatch: the same digest was declared with another size or chunking.
        """
        current = self._pending.get(ref.digest)
        if current is not None:
            if current.ref != ref:
                raise ChunkMismatch(f"blob {ref.digest[:12]} declared twice with different layout")
            return False
        self.check_ref(ref)
        lim = self.limits
        reserved = sum(p.ref.size for p in self._pending.values())
        if len(self._pending) >= lim.max_pending or reserved + ref.size > lim.max_pending_bytes:
            self.stats.refused += 1
            raise BlobTooLarge(
                f"no room for blob {ref.digest[:12]}: {len(self._pending)} pending, "
                f"{reserved} bytes reserved"
            )
        self._completed.pop(ref.digest, None)
        self._pending[ref.digest] = _Pending(
            ref=ref,
            buffer=bytearray(ref.size),
            received=bytearray(ref.count),
            remaining=ref.count,
            last_progress=self.clock(),
        )
        return True

    # -- chunks ---------------------------------------------------------------------
    def add(self, chunk: Chunk) -> bytes | None:
        """Store one chunk; returns the whole blob once complete and verified.

        Returns None for a chunk that is stored, a duplicate, or a late chunk of
        a blob already completed.
        Raises:
            UnknownBlob: no declared blob has this digest.
            ChunkMismatch: count or payload length contradicts the declaration.
            DigestMismatch: the completed blob's SHA-256 is wrong (the blob is dropped).
        """
        key = chunk.hex_digest
        pending = self._pending.get(key)
        if pending is None:
            if key in self._completed:
                self.stats.late += 1
                return None
            raise UnknownBlob(f"chunk for undeclared blob {key[:12]}")
        ref = pending.ref
        if chunk.count != ref.count:
            raise ChunkMismatch(f"chunk says {chunk.count} chunks, blob declared {ref.count}")
        want = expected_length(ref, chunk.index)
        if len(chunk.payload) != want:
            raise ChunkMismatch(
                f"chunk {chunk.index} has {len(chunk.payload)} bytes, expected {want}"
            )
        if pending.received[chunk.index]:
            pending.duplicates += 1
            self.stats.duplicates += 1
            return None
        start = chunk.index * ref.chunk_size
        pending.buffer[start : start + want] = chunk.payload
        pending.received[chunk.index] = 1
        pending.remaining -= 1
        pending.last_progress = self.clock()
        if pending.remaining:
            return None
        del self._pending[key]
        blob = bytes(pending.buffer)
        if sha256(blob).hex() != key:
            raise DigestMismatch(f"assembled blob does not hash to {key[:12]}")
        self._remember(key)
        self.stats.completed += 1
        return blob

    def _remember(self, key: str) -> None:
        self._completed[key] = None
        while len(self._completed) > self.limits.remember_completed:
            self._completed.popitem(last=False)

    # -- bookkeeping ------------------------------------------------------------------
    def missing(self, digest: str) -> list[int]:
        """Indices not yet received for a pending blob (empty if not pending)."""
        pending = self._pending.get(digest)
        if pending is None:
            return []
        return [i for i, got in enumerate(pending.received) if not got]

    def quiet_for(self, digest: str) -> float:
        """Seconds since the pending blob last made progress (0 if not pending)."""
        pending = self._pending.get(digest)
        return 0.0 if pending is None else self.clock() - pending.last_progress

    def pending(self) -> list[str]:
        return list(self._pending)

    def is_pending(self, digest: str) -> bool:
        return digest in self._pending

    def discard(self, digest: str) -> None:
        self._pending.pop(digest, None)

    def expire(self) -> list[str]:
        """Drop blobs with no progress for ``timeout_s``; returns their digests."""
        now = self.clock()
        dead = [
            k for k, p in self._pending.items() if now - p.last_progress > self.limits.timeout_s
        ]
        for k in dead:
            del self._pending[k]
        self.stats.expired += len(dead)
        return dead
