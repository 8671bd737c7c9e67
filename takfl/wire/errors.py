"""Named errors of the wire format: malformed input raises a subclass of :class:`WireError`."""

from __future__ import annotations


class WireError(ValueError):
    """Base of every error raised while encoding or decoding wire data."""


class TopicError(WireError):
    """A topic or identifier does not follow the ``takfl/<fleet>/...`` layout."""


class MalformedMessage(WireError):
    """A JSON message is not valid UTF-8 JSON, or does not match its schema."""


class MalformedChunk(WireError):
    """A binary chunk has a bad header, a bad length or inconsistent fields."""


class CodecError(WireError):
    """A tensor blob cannot be encoded or is not a valid encoded state."""


class LayoutMismatch(CodecError):
    """A packed blob was made for another model layout (names, shapes or dtypes) than the
    receiver's reference."""


class BlobTooLarge(WireError):
    """A declared blob exceeds the size or chunk-count cap (checked before allocating)."""


class ChunkMismatch(WireError):
    """A chunk or a declaration contradicts what was declared earlier for the same blob."""


class UnknownBlob(WireError):
    """A chunk arrived for a blob that was never declared (or was already dropped)."""


class DigestMismatch(WireError):
    """The SHA-256 of an assembled blob is not the digest it was announced with."""


class SecretError(WireError):
    """A secret file is missing, unreadable or holds no valid secret."""


class UnsupportedVersion(WireError):
    """A message of another major protocol version: not decoded. ``received`` is the JSON
    object as it came (for the one message read across majors: the refusal of a
    registration, see :func:`takfl.wire.messages.decode_version_refusal`)."""

    def __init__(self, what: str, version: str, received: dict[str, object]) -> None:
        super().__init__(f"{what}: protocol {version}, this code speaks another major version")
        self.version = version
        self.received = received
