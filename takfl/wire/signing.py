"""HMAC-SHA256 authentication of wire headers with per-agent secrets.

The signature covers the canonical encoding of every header field except the
signature itself (see :meth:`SignedMessage.signing_payload`): the message kind,
round id, agent id, prototype and, for updates, the digest of the blob, so a
header cannot be replayed for another round, agent or blob. Comparison is
constant-time. Secret files (reading and writing) are in :mod:`takfl.secret_files`.
"""

from __future__ import annotations

import hmac
import secrets
from hashlib import sha256
from typing import TypeVar

from takfl.wire.errors import SecretError
from takfl.wire.messages import SignedMessage

SECRET_BYTES = 32  # generated secrets
MIN_SECRET_BYTES = 16  # shortest secret accepted from a file
DOMAIN = b"takfl-wire-v1\x00"  # prefix of every signed payload

S = TypeVar("S", bound=SignedMessage)


def generate_secret() -> bytes:
    """A fresh random secret of ``SECRET_BYTES`` bytes."""
    return secrets.token_bytes(SECRET_BYTES)


def hmac_hex(secret: bytes, payload: bytes) -> str:
    """Hex HMAC-SHA256 of ``payload`` under ``secret`` (domain-separated)."""
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretError(f"secret of {len(secret)} bytes is too short (min {MIN_SECRET_BYTES})")
    return hmac.new(secret, DOMAIN + payload, sha256).hexdigest()


def sign(message: S, secret: bytes) -> S:
    """A copy of ``message`` with its ``signature`` set."""
    return message.model_copy(update={"signature": hmac_hex(secret, message.signing_payload())})


def verify(message: SignedMessage, secret: bytes) -> bool:
    """True iff ``message.signature`` is the HMAC of its other fields under ``secret``."""
    if not message.signature:
        return False
    expected = hmac_hex(secret, message.signing_payload())
    return hmac.compare_digest(expected, message.signature)


def message_ref(message: SignedMessage) -> str:
    """Hex SHA-256 naming one exact signed message (its signed fields and signature)."""
    return sha256(message.signing_payload() + message.signature.encode()).hexdigest()
