"""The envelope of every JSON message, and how a message becomes bytes and back.

Every JSON message carries :data:`ENVELOPE`: ``protocol`` (the protocol version,
``"1.0"``), ``kind`` (which message it is), ``run`` (the coordinator's run id), ``sent_at``
and ``nonce`` (freshness, :mod:`takfl.wire.freshness`) and ``signature``
(:mod:`takfl.wire.signing`). On the wire a message is its canonical JSON
(:mod:`takfl.wire.canonical`). It is decoded strictly: unknown keys, wrong types,
out-of-range values or a missing envelope key raise
:class:`~takfl.wire.errors.MalformedMessage`; another major version raises
:class:`~takfl.wire.errors.UnsupportedVersion`; a higher minor version is read leniently
(:mod:`takfl.wire.version`). A decoded message keeps the JSON object it came as, so its
signature is checked over exactly the bytes its sender signed.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, ValidationError

from takfl.wire.canonical import canonical_bytes, parse_json
from takfl.wire.errors import MalformedMessage, UnsupportedVersion
from takfl.wire.freshness import NONCE_PATTERN, new_nonce
from takfl.wire.lenient import known_part
from takfl.wire.reasons import NEWER_MINOR
from takfl.wire.version import VERSION_PATTERN, Compatibility, compatibility, current

# Keys every JSON message has on the wire (receivers refuse a message without one).
ENVELOPE = ("protocol", "kind", "run", "sent_at", "nonce", "signature")
# Keys left out of a message's content reference (what a re-sent copy shares).
FRESHNESS = ("sent_at", "nonce", "signature")
MAX_MESSAGE_BYTES = 64 * 1024  # a JSON message larger than this is refused unread

Signature = Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{64})?$")]
ProtocolVersion = Annotated[str, StringConstraints(pattern=VERSION_PATTERN)]
RunId = Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{32})?$")]  # "" before any run
Nonce = Annotated[str, StringConstraints(pattern=NONCE_PATTERN)]
UnixTime = Annotated[float, Field(ge=0, allow_inf_nan=False)]
RUN_BYTES = 16


def new_run_id() -> str:
    """A fresh run id (16 random bytes, hex): the coordinator makes one per run."""
    return secrets.token_hex(RUN_BYTES)


WIRE_MODEL = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


class Strict(BaseModel):
    model_config = WIRE_MODEL


def _envelope_required(schema: dict[str, Any], cls: type) -> None:
    """JSON Schema: the envelope keys are required on the wire (in Python they default)."""
    schema["required"] = list(dict.fromkeys([*ENVELOPE, *schema.get("required", [])]))


class WireMessage(Strict):
    """Base of every JSON message: the envelope. Built in Python, a message gets this
    code's protocol version, no run, the time and a fresh nonce unless told otherwise;
    received, every envelope key must be there."""

    model_config = ConfigDict(**WIRE_MODEL, json_schema_extra=_envelope_required)

    protocol: ProtocolVersion = Field(default_factory=current)  # "<major>.<minor>"
    run: RunId = ""  # the coordinator's run this message belongs to
    sent_at: UnixTime = Field(default_factory=time.time)  # unix seconds, sender's clock
    nonce: Nonce = Field(default_factory=new_nonce)  # 16 random bytes, hex


def signed_part(obj: dict[str, Any]) -> bytes:
    """Canonical bytes of a message object without its ``signature``: what is signed."""
    return canonical_bytes({k: v for k, v in obj.items() if k != "signature"})


class SignedMessage(WireMessage):
    """A message authenticated with the sender's per-agent secret (see ``takfl.wire.signing``)."""

    signature: Signature = ""
    _received: dict[str, Any] | None = PrivateAttr(default=None)  # the JSON object received
    # optional fields added to 1.0 after its first messages: left out when absent, so a
    # message that does not use them is the same bytes as before they existed
    OMITTED_WHEN_ABSENT: ClassVar[frozenset[str]] = frozenset()

    def wire_object(self) -> dict[str, Any]:
        """This message as a JSON object: as it was received, or as this code builds it
        (every field, ``null`` for an absent optional value, but those of
        ``OMITTED_WHEN_ABSENT``, which are left out)."""
        if self._received is not None:
            return dict(self._received)
        obj = self.model_dump(mode="json", by_alias=True)
        for key in self.OMITTED_WHEN_ABSENT:
            if obj.get(key) is None:
                obj.pop(key, None)
        return obj

    def signing_payload(self) -> bytes:
        """Canonical bytes covered by the signature: the object without ``signature``."""
        return signed_part(self.wire_object())

    def content_ref(self) -> str:
        """Hex SHA-256 of the message without ``sent_at``, ``nonce`` and ``signature``:
        the same for every re-sent copy of one message."""
        body = {k: v for k, v in self.wire_object().items() if k not in FRESHNESS}
        return hashlib.sha256(canonical_bytes(body)).hexdigest()

    def __eq__(self, other: object) -> bool:
        """Equal fields (how a message was received does not matter)."""
        return type(other) is type(self) and self.__dict__ == other.__dict__

    __hash__ = WireMessage.__hash__

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Any:
        """A copy; with ``update`` it is a new message (its received form forgotten)."""
        copied = super().model_copy(update=update, deep=deep)
        if update:
            copied._received = None
        return copied


M = TypeVar("M", bound=SignedMessage)


def encode_message(message: SignedMessage) -> bytes:
    """The wire bytes of ``message``: its canonical JSON, signature included."""
    return canonical_bytes(message.wire_object())


def _problems(e: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
        for err in e.errors()[:5]
    )


def received_object(what: str, data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """The JSON object of a received message (size capped before parsing)."""
    if not isinstance(data, bytes | bytearray):
        raise MalformedMessage(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MalformedMessage(f"{what}: {len(data)} bytes exceeds the {max_bytes} cap")
    try:
        obj = parse_json(data)
    except MalformedMessage as e:
        raise MalformedMessage(f"{what}: {e}") from e
    if not isinstance(obj, dict):
        raise MalformedMessage(f"{what}: not a JSON object")
    return obj


def validate_object(cls: type[M], obj: dict[str, Any], raw: bytes | None) -> M:
    """Validate ``obj`` as ``cls``: strictly from ``raw`` (the received bytes), or, with
    ``raw`` None, leniently (a higher minor version: unknown keys and reasons ignored)."""
    missing = [k for k in ENVELOPE if k not in obj]
    if missing:
        raise MalformedMessage(f"{cls.__name__}: missing {', '.join(missing)}")
    try:
        if raw is None:
            text = canonical_bytes(known_part(cls, obj))
            msg = cls.model_validate_json(text, context={NEWER_MINOR: True})
        else:
            msg = cls.model_validate_json(raw)
    except ValidationError as e:
        raise MalformedMessage(f"{cls.__name__}: {_problems(e)}") from e
    msg._received = obj
    return msg


def decode_message(cls: type[M], data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Parse and validate ``data`` as a ``cls`` message.

    Raises:
        MalformedMessage: not a valid message of this kind.
        UnsupportedVersion: a message of another major version.
    """
    obj = received_object(cls.__name__, data, max_bytes)
    version = obj.get("protocol")
    try:
        how = compatibility(version)  # type: ignore[arg-type]
    except ValueError:
        raise MalformedMessage(
            f"{cls.__name__}: protocol {str(version)[:16]!r} is not a version "
            "(a message from before protocol 1.0?)"
        ) from None
    if how is Compatibility.OTHER_MAJOR:
        raise UnsupportedVersion(cls.__name__, str(version), obj)
    return validate_object(cls, obj, bytes(data) if how is Compatibility.STRICT else None)
