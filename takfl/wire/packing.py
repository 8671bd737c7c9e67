"""The packed container of the sub-byte codecs and the byte-level pieces they share.

A packed blob is ``b"TKP"``, a version byte (1), the codec's name (a u8 length, then
ASCII) and the *payload*: 5 + len(name) bytes of framing, where a safetensors file
would spend about 100 on its JSON header, which is most of a small model's update at a
bit per weight. (No safetensors blob this codec accepts starts with those four bytes:
they would declare a header beyond its 16 MiB cap.) Names, shapes and dtypes are not
sent: both ends know the model, so the payload is read against the receiver's reference
state (its :func:`layout`: entries sorted by name), the state the delta applies to. The
payload starts with the layout's 4-byte :func:`fingerprint`, so a blob made for another
model is refused before anything is read; then the codec's settings; then one section
per entry in layout order (:mod:`takfl.wire.sections`).

Shared encodings: unsigned LEB128 varints (7 bits per byte, low group first, high bit set
on every byte but the last, minimal length); bit fields packed little-endian (value ``i``
of width ``b`` occupies bits ``i*b .. i*b+b-1``, bit ``j`` of the stream is bit ``j % 8``
of byte ``j // 8``), unused bits of the last byte zero; numbers little-endian. Readers
check every length against what is left before taking it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from takfl.state import StateView
from takfl.wire.errors import CodecError, LayoutMismatch

MAGIC = b"TKP"
PACK_VERSION = 1
MAX_NAME_BYTES = 32
FRAME_BYTES = len(MAGIC) + 2 + MAX_NAME_BYTES  # the most framing before a payload
FINGERPRINT_BYTES = 4
INDEX_VARINT_BYTES = 5  # counts and indices: below 2**32
MAX_VARINT_BYTES = 10  # any 64-bit value
MAX_NUMEL = 2**32 - 1  # entries of one tensor a packed codec can address


@dataclass(frozen=True)
class Entry:
    """One tensor of the reference layout."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # the reference's dtype (floating entries decode as float32)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def floating(self) -> bool:
        return self.dtype.is_floating_point


def layout(reference: StateView) -> list[Entry]:
    """The entries of ``reference`` in the order of their names (the payload's order).

    Raises:
        CodecError: a complex tensor, or one too large to address.
    """
    out = []
    for name in sorted(reference):
        t = reference[name]
        if t.dtype.is_complex:
            raise CodecError(f"{name}: complex tensors are not supported")
        entry = Entry(name, tuple(int(d) for d in t.shape), t.dtype)
        if entry.numel > MAX_NUMEL:
            raise CodecError(f"{name}: {entry.numel} entries is beyond a packed codec")
        out.append(entry)
    return out


def _dtype_code(entry: Entry) -> str:
    return "float" if entry.floating else str(entry.dtype).removeprefix("torch.")


def fingerprint(entries: Sequence[Entry]) -> bytes:
    """First 4 bytes of the SHA-256 of the lines ``name dtype d0,d1,..`` (dtype ``float``
    for every floating entry, else torch's name: ``int64``, ``bool``), one per entry in
    layout order, each ending with a newline."""
    text = "".join(f"{e.name} {_dtype_code(e)} {','.join(map(str, e.shape))}\n" for e in entries)
    return hashlib.sha256(text.encode()).digest()[:FINGERPRINT_BYTES]


# -- shared randomness ---------------------------------------------------------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
SEED_MASK = 2**32 - 1  # seeds travel as u32


def draws(seed: int, position: int, length: int) -> np.ndarray:
    """The pseudo-random uint64 draws of entries ``0 .. length-1`` of the entry at layout
    ``position`` (from 0, every entry counted): ``splitmix64(seed + (c + 1) * 0x9E3779B97F4A7C15)``
    with ``c = position * 2**32 + j``, all mod 2**64, where ``splitmix64(z)`` is
    ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB;
    z ^= z >> 31``."""
    c = np.uint64(position << 32) + np.arange(length, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed & SEED_MASK) + (c + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


# -- the container ------------------------------------------------------------------------
def pack(codec: str, payload: bytes) -> bytes:
    """The packed blob carrying ``payload`` for ``codec``."""
    name = codec.encode("ascii")
    return MAGIC + bytes((PACK_VERSION, len(name))) + name + payload


def packed_codec(blob: bytes) -> str | None:
    """The codec a packed blob names; None when ``blob`` is not a packed blob.

    Raises:
        CodecError: it starts like one but its version or name is malformed.
    """
    if bytes(blob[: len(MAGIC)]) != MAGIC:
        return None
    head = len(MAGIC) + 2
    if len(blob) < head:
        raise CodecError(f"truncated packed blob of {len(blob)} bytes")
    if blob[len(MAGIC)] != PACK_VERSION:
        raise CodecError(f"packed blob of an unknown version (takfl speaks {PACK_VERSION})")
    n = blob[len(MAGIC) + 1]
    name = bytes(blob[head : head + n])
    if n > MAX_NAME_BYTES or len(name) != n or not name.isascii():
        raise CodecError("packed blob with a malformed codec name")
    return name.decode("ascii")


def unpack(blob: bytes, codec: str, *, max_bytes: int | None) -> memoryview:
    """The payload of a :func:`pack` blob for ``codec``.

    Raises:
        CodecError: over ``max_bytes``, not a packed blob, or another codec's.
    """
    if not isinstance(blob, bytes | bytearray):
        raise CodecError(f"expected bytes, got {type(blob).__name__}")
    if max_bytes is not None and len(blob) > max_bytes:
        raise CodecError(f"blob of {len(blob)} bytes exceeds the {max_bytes}-byte cap")
    name = packed_codec(blob)
    if name != codec:
        raise CodecError(f"not a {codec} blob (it is {name or 'not a packed blob'})")
    return memoryview(blob)[len(MAGIC) + 2 + len(name) :]


# -- writing -------------------------------------------------------------------------------
def varints(values: np.ndarray) -> bytes:
    """LEB128 bytes of ``values`` (non-negative integers below 2**64), in order."""
    v = np.asarray(values, dtype=np.uint64)
    nbytes = np.ones(v.shape, dtype=np.int64)
    for group in range(1, MAX_VARINT_BYTES):
        nbytes += v >= np.uint64(1 << (7 * group))
    owner = np.repeat(np.arange(v.size), nbytes)
    first = np.repeat(np.cumsum(nbytes) - nbytes, nbytes)
    j = np.arange(owner.size) - first
    low = (v[owner] >> (7 * j).astype(np.uint64)) & np.uint64(0x7F)
    more = (j < nbytes[owner] - 1).astype(np.uint64) << np.uint64(7)
    return (low | more).astype(np.uint8).tobytes()


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """``codes`` (integers in [0, 2**bits)) as a little-endian bit field."""
    c = np.asarray(codes, dtype=np.uint8).reshape(-1)
    planes = (c[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def u8(value: int) -> bytes:
    return bytes((value,))


def u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def f16(values: torch.Tensor, what: str) -> bytes:
    """``values`` as little-endian float16.

    Raises:
        CodecError: a value beyond the float16 range (non-finite values: the caller's).
    """
    v = values.detach().to("cpu", torch.float32).reshape(-1)
    if bool((v.abs() > 65504.0).any()):
        raise CodecError(f"{what}: values beyond the float16 range")
    return v.to(torch.float16).numpy().astype("<f2").tobytes()


# -- reading -------------------------------------------------------------------------------
class Reader:
    """Takes fields off a payload front to back; every take checks what is left first."""

    def __init__(self, payload: memoryview | bytes, codec: str) -> None:
        self.buf = np.frombuffer(payload, dtype=np.uint8)
        self.pos = 0
        self.codec = codec

    @property
    def left(self) -> int:
        return self.buf.size - self.pos

    def fail(self, what: str) -> CodecError:
        return CodecError(f"{self.codec} payload, byte {self.pos}: {what}")

    def take(self, n: int, what: str) -> np.ndarray:
        """The next ``n`` bytes (a view, nothing allocated)."""
        if n < 0 or n > self.left:
            raise self.fail(f"{what} needs {n} bytes, {self.left} left")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return int(self.take(1, what)[0])

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what).tobytes(), "little")

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        """``count`` values of the little-endian numpy ``dtype`` (a copy)."""
        size = np.dtype(dtype).itemsize
        return self.take(count * size, what).view(dtype).copy()

    def scales(self, count: int, what: str) -> np.ndarray:
        """``count`` float16 scales as float32, each finite and not negative."""
        values = self.array("<f2", count, what).astype(np.float32)
        if values.size and not bool((np.isfinite(values) & (values >= 0)).all()):
            raise self.fail(f"{what}: a scale that is negative, NaN or infinite")
        return values

    def varint(self, what: str) -> int:
        return int(self.varints(1, what)[0])

    def varints(self, count: int, what: str, *, max_bytes: int = INDEX_VARINT_BYTES) -> np.ndarray:
        """``count`` minimally encoded LEB128 values as uint64, each at most ``max_bytes``
        long (5: below 2**32; 10: below 2**64)."""
        if count == 0:
            return np.zeros(0, dtype=np.uint64)
        if count > self.left:  # every varint takes at least one byte
            raise self.fail(f"{what}: {count} varints do not fit in what is left")
        window = self.buf[self.pos : self.pos + max_bytes * count]
        ends = np.flatnonzero(window < 0x80)
        if ends.size < count:
            raise self.fail(f"{what}: {count} varints do not fit in what is left")
        ends = ends[:count]
        body = window[: int(ends[-1]) + 1]
        starts = np.concatenate(([0], ends[:-1] + 1))
        lengths = ends - starts + 1
        if int(lengths.max()) > max_bytes:
            raise self.fail(f"{what}: a varint longer than {max_bytes} bytes")
        if bool(((lengths > 1) & (body[ends] == 0)).any()):
            raise self.fail(f"{what}: a varint is not minimally encoded")
        if max_bytes == INDEX_VARINT_BYTES and bool(
            ((lengths == max_bytes) & (body[ends] > 0x0F)).any()
        ):
            raise self.fail(f"{what}: a varint beyond 2**32 - 1")
        if bool(((lengths == MAX_VARINT_BYTES) & (body[ends] > 1)).any()):
            raise self.fail(f"{what}: a varint beyond 2**64 - 1")
        j = np.arange(body.size) - np.repeat(starts, lengths)
        groups = (body & 0x7F).astype(np.uint64) << (7 * j).astype(np.uint64)
        self.pos += body.size
        return np.bitwise_or.reduceat(groups, starts)

    def bits(self, count: int, bits: int, what: str) -> np.ndarray:
        """``count`` codes of ``bits`` bits each (uint8); unused bits must be zero."""
        nbytes = (count * bits + 7) // 8
        data = self.take(nbytes, what)
        stream = np.unpackbits(data, bitorder="little")
        if bool(stream[count * bits :].any()):
            raise self.fail(f"{what}: unused bits of the last byte are not zero")
        planes = stream[: count * bits].reshape(count, bits)
        return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)

    def finish(self) -> None:
        """Refuse trailing bytes after the last section."""
        if self.left:
            raise self.fail(f"{self.left} bytes after the last section")


def read_start(payload: memoryview, codec: str, entries: Sequence[Entry]) -> Reader:
    """A reader positioned after the payload's fingerprint, which must be ``entries``'.

    Raises:
        LayoutMismatch: the blob was made for another model (names, shapes or dtypes).
    """
    reader = Reader(payload, codec)
    got = reader.take(FINGERPRINT_BYTES, "fingerprint").tobytes()
    if got != fingerprint(entries):
        raise LayoutMismatch(
            f"{codec} blob was made for another model layout (fingerprint {got.hex()}, "
            f"expected {fingerprint(entries).hex()})"
        )
    return reader
