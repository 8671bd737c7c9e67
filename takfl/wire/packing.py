"""The packed container of the sub-byte codecs and the byte-level pieces they share.

A packed blob is ``b"TKP"``, a version byte (1), the codec's name (a u8 length, then
ASCII) and the *payload*: 5 + len(name) bytes of framing, where a safetensors file
would spend about 100 on its JSON header, which is most of a small model's update at a
bit per weight. (No safetensors blob this codec accepts starts with those four bytes:
they would declare a header beyond its 16 MiB cap.) Names, shapes and dtypes are not
sent: both ends know the model, so the payload is read against the receiver's reference
state (its :func:`layout`: entries sorted by name). The payload starts with the
layout's 8-byte :func:`fingerprint`, so a blob made for another model is refused before
anything is read. Then come the codec's own settings and one section per entry in
layout order:

- a floating entry of two or more dimensions (weights, kernels) as the codec encodes it;
- a floating entry of at most one dimension (biases, normalisation weights and running
  statistics: about 1 % of a model) as its float16 values, finite: the codecs' coarse
  steps and error feedback would drive a running variance negative (vectors go
  uncompressed in PowerSGD, Vogels et al. 2019, for the same reasons);
- any other entry (integer counters, boolean masks) as its raw little-endian bytes.

Shared encodings: unsigned LEB128 varints (7 bits per byte, low group first, high bit set
on every byte but the last, minimal length, at most 5 bytes: values below 2**32); bit
fields packed little-endian (value ``i`` of width ``b`` occupies bits ``i*b .. i*b+b-1``,
bit ``j`` of the stream is bit ``j % 8`` of byte ``j // 8``), unused bits of the last byte
zero. Readers check every length against what is left before taking it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from takfl.state import State, StateView
from takfl.wire.codec import FP16_MAX
from takfl.wire.errors import CodecError, LayoutMismatch

MAGIC = b"TKP"
PACK_VERSION = 1
MAX_NAME_BYTES = 32
FRAME_BYTES = len(MAGIC) + 2 + MAX_NAME_BYTES  # the most framing before a payload
FINGERPRINT_BYTES = 8
MAX_VARINT_BYTES = 5
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

    @property
    def compressed(self) -> bool:
        """Whether the codec encodes it (floating, two or more dimensions)."""
        return self.floating and len(self.shape) >= 2


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
    """First 8 bytes of the SHA-256 of the lines ``name dtype d0,d1,..`` (dtype
    ``float`` for every floating entry), one per entry in layout order."""
    text = "".join(f"{e.name} {_dtype_code(e)} {','.join(map(str, e.shape))}\n" for e in entries)
    return hashlib.sha256(text.encode()).digest()[:FINGERPRINT_BYTES]


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
    """LEB128 bytes of ``values`` (non-negative integers below 2**32), in order."""
    v = np.asarray(values, dtype=np.uint64)
    if v.size and int(v.max()) > MAX_NUMEL:
        raise CodecError(f"varint value {int(v.max())} is beyond 2**32 - 1")
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


def vector(x: torch.Tensor, name: str) -> bytes:
    """A floating entry of at most one dimension as little-endian float16 (finite)."""
    v = x.detach().to("cpu", torch.float32).reshape(-1)
    if not bool(torch.isfinite(v).all()):
        raise CodecError(f"{name}: non-finite values cannot be encoded")
    if bool((v.abs() > FP16_MAX).any()):
        raise CodecError(f"{name}: values beyond the float16 range")
    return v.to(torch.float16).numpy().astype("<f2").tobytes()


# section(position in the layout, entry, flat float32 values, all finite) -> bytes
Section = Callable[[int, "Entry", torch.Tensor], bytes]


def encode_entries(delta: StateView, entries: Sequence[Entry], section: Section) -> bytes:
    """The sections of every entry of ``delta`` in layout order: ``section`` for the
    compressed entries, float16 for the other floating ones, raw bytes for the rest."""
    parts = []
    for position, e in enumerate(entries):
        t = delta[e.name]
        if e.compressed:
            x = t.detach().to("cpu", torch.float32).reshape(-1)
            if not bool(torch.isfinite(x).all()):
                raise CodecError(f"{e.name}: non-finite values cannot be encoded")
            parts.append(section(position, e, x))
        elif e.floating:
            parts.append(vector(t, e.name))
        else:
            parts.append(raw(t))
    return b"".join(parts)


def max_payload(reference: StateView, head: int, compressed: Callable[[int], int]) -> int:
    """A bound on a packed blob for ``reference``'s layout: framing, fingerprint, ``head``
    bytes of settings, ``compressed(numel)`` per compressed entry, the others as sent."""
    total = FRAME_BYTES + FINGERPRINT_BYTES + head
    for e in layout(reference):
        if e.compressed:
            total += compressed(e.numel)
        else:
            total += e.numel * (2 if e.floating else e.dtype.itemsize)
    return total


def u8(value: int) -> bytes:
    return struct.pack("<B", value)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def raw(t: torch.Tensor) -> bytes:
    """A non-floating tensor's values as little-endian bytes."""
    a = t.detach().to("cpu").contiguous().numpy()
    return a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


# -- reading -------------------------------------------------------------------------------
class Reader:
    """Takes fields off a payload front to back; every take checks what is left first."""

    def __init__(self, payload: memoryview | bytes, codec: str) -> None:
        self.buf = np.frombuffer(payload, dtype=np.uint8)
        self.pos = 0
        self.codec = codec

    def fail(self, what: str) -> CodecError:
        return CodecError(f"{self.codec} payload, byte {self.pos}: {what}")

    def take(self, n: int, what: str) -> np.ndarray:
        """The next ``n`` bytes (a view, nothing allocated)."""
        if n < 0 or n > self.buf.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes, {self.buf.size - self.pos} left")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return int(self.take(1, what)[0])

    def u64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what).tobytes(), "little")

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        """``count`` values of the little-endian numpy ``dtype`` (a copy)."""
        size = np.dtype(dtype).itemsize
        return self.take(count * size, what).view(dtype).copy()

    def varint(self, what: str) -> int:
        return int(self.varints(1, what)[0])

    def varints(self, count: int, what: str) -> np.ndarray:
        """``count`` LEB128 values as uint64 (each below 2**32, minimally encoded)."""
        if count == 0:
            return np.zeros(0, dtype=np.uint64)
        window = self.buf[self.pos : self.pos + MAX_VARINT_BYTES * count]
        ends = np.flatnonzero(window < 0x80)
        if ends.size < count:
            raise self.fail(f"{what}: {count} varints do not fit in what is left")
        ends = ends[:count]
        body = window[: int(ends[-1]) + 1]
        starts = np.concatenate(([0], ends[:-1] + 1))
        lengths = ends - starts + 1
        if int(lengths.max()) > MAX_VARINT_BYTES:
            raise self.fail(f"{what}: a varint longer than {MAX_VARINT_BYTES} bytes")
        if bool(((lengths > 1) & (body[ends] == 0)).any()):
            raise self.fail(f"{what}: a varint is not minimally encoded")
        j = np.arange(body.size) - np.repeat(starts, lengths)
        groups = (body & 0x7F).astype(np.uint64) << (7 * j).astype(np.uint64)
        values = np.add.reduceat(groups, starts)
        if int(values.max()) > MAX_NUMEL:
            raise self.fail(f"{what}: a varint beyond 2**32 - 1")
        self.pos += body.size
        return values

    def bits(self, count: int, bits: int, what: str) -> np.ndarray:
        """``count`` codes of ``bits`` bits each (uint8); unused bits must be zero."""
        nbytes = (count * bits + 7) // 8
        data = self.take(nbytes, what)
        stream = np.unpackbits(data, bitorder="little")
        if bool(stream[count * bits :].any()):
            raise self.fail(f"{what}: unused bits of the last byte are not zero")
        planes = stream[: count * bits].reshape(count, bits)
        return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)

    def exact(self, entry: Entry) -> torch.Tensor:
        """A non-floating entry from its raw bytes, in the reference's dtype and shape."""
        dtype = torch.empty(0, dtype=entry.dtype).numpy().dtype.newbyteorder("<")
        values = self.array(dtype.str, entry.numel, entry.name)
        if entry.dtype == torch.bool and bool((values.view(np.uint8) > 1).any()):
            raise self.fail(f"{entry.name}: boolean bytes other than 0 and 1")
        return torch.from_numpy(values.astype(dtype.newbyteorder("="))).reshape(entry.shape)

    def vector(self, entry: Entry) -> torch.Tensor:
        """A floating entry of at most one dimension from its float16 values."""
        values = self.array("<f2", entry.numel, entry.name).astype(np.float32)
        if not bool(np.isfinite(values).all()):
            raise self.fail(f"{entry.name}: a value that is NaN or infinite")
        return torch.from_numpy(values).reshape(entry.shape)

    def entries(self, entries: Sequence[Entry], section: ReadSection) -> State:
        """Every entry in layout order (``section`` reads the compressed ones, flat), then
        checks that nothing is left."""
        out: State = {}
        for position, e in enumerate(entries):
            if e.compressed:
                out[e.name] = section(self, position, e).reshape(e.shape)
            elif e.floating:
                out[e.name] = self.vector(e)
            else:
                out[e.name] = self.exact(e)
        self.finish()
        return out

    def finish(self) -> None:
        """Refuse trailing bytes after the last section."""
        if self.pos != self.buf.size:
            raise self.fail(f"{self.buf.size - self.pos} bytes after the last section")


# section(reader, position in the layout, entry) -> flat float32 values
ReadSection = Callable[[Reader, int, Entry], torch.Tensor]


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


def check_finite_nonneg(values: np.ndarray, reader: Reader, what: str) -> None:
    """Scales are finite and not negative."""
    if values.size and not bool((np.isfinite(values) & (values >= 0)).all()):
        raise reader.fail(f"{what}: a scale that is negative, NaN or infinite")
