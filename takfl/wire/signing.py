"""HMAC-SHA256 authentication of wire messages with per-agent secrets.

The signature covers the canonical bytes of the message object without ``signature``
(:func:`takfl.wire.messages.signed_part`), prefixed with ``DOMAIN``: every field, the
envelope (protocol version, run, ``sent_at``, ``nonce``) included, so a message cannot be
replayed for another round, agent, blob or run, nor again later (a receiver refuses a
nonce it has seen, :mod:`takfl.wire.freshness`). A received message is checked over the
object as received, never over a re-encoding of its typed fields. Comparison is
constant-time. Secret files (reading and writing) are in :mod:`takfl.secret_files`.
"""

from __future__ import annotations

import hmac
import secrets
import time
from hashlib import sha256
from typing import Any, TypeVar

from takfl.wire.envelope import SignedMessage, signed_part
from takfl.wire.errors import SecretError
from takfl.wire.freshness import new_nonce

SECRET_BYTES = 32  # generated secrets
MIN_SECRET_BYTES = 16  # shortest secret accepted from a file
DOMAIN = b"takfl-wire-v1\x00"  # prefix of every signed payload (the same in every 1.x)

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


def restamp(message: S, secret: bytes, now: float | None = None) -> S:
    """``message`` sent again: a fresh ``sent_at`` (``now``, default the time) and nonce,
    signed anew (a receiver refuses the same nonce twice)."""
    fresh = message.model_copy(
        update={
            "sent_at": time.time() if now is None else now,
            "nonce": new_nonce(),
            "signature": "",
        }
    )
    return sign(fresh, secret)


def verify_object(obj: dict[str, Any], secret: bytes) -> bool:
    """True iff ``obj["signature"]`` is the HMAC of the rest of ``obj`` under ``secret``."""
    signature = obj.get("signature")
    if not isinstance(signature, str) or not signature:
        return False
    return hmac.compare_digest(hmac_hex(secret, signed_part(obj)), signature)


def verify(message: SignedMessage, secret: bytes) -> bool:
    """True iff ``message.signature`` is the HMAC of its other fields under ``secret``
    (of the object as received, for a received message)."""
    return verify_object(message.wire_object(), secret)


def object_ref(obj: dict[str, Any]) -> str:
    """Hex SHA-256 naming one exact message object: its signed bytes, then its signature."""
    return sha256(signed_part(obj) + str(obj.get("signature", "")).encode()).hexdigest()


def message_ref(message: SignedMessage) -> str:
    """Hex SHA-256 naming one exact signed message (its signed fields and signature)."""
    return object_ref(message.wire_object())
