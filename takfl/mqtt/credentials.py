"""Broker credentials derived from an agent's secret, so a device holds one secret file."""

from __future__ import annotations

import hashlib
import hmac

_LABEL = b"takfl-mqtt-password-v1"


def mqtt_password(secret: bytes) -> str:
    """The agent's broker password: HMAC-SHA256(secret, label), 32 hex characters.

    The coordinator writes the same value into Mosquitto's password file; knowing the
    password does not reveal the signing secret.
    """
    return hmac.new(secret, _LABEL, hashlib.sha256).hexdigest()[:32]
