"""Vectors of the edge cases an implementer must get right: canonical JSON (floats in
exponent form, negative zero, integral floats, unicode and astral keys and strings,
escapes), a message written by a native sender (keys in any order, whitespace, an integer
token in a float field), an optional field omitted and present-but-null, the version
rule (a higher minor with unknown fields, another major, and the refusal read across
majors), the broker password, the replay window and the enumerated reasons."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from takfl.mqtt.credentials import mqtt_password
from takfl.wire.canonical import canonical_bytes, parse_json
from takfl.wire.freshness import DEFAULT_WINDOW_S
from takfl.wire.messages import UpdateHeader
from takfl.wire.reasons import REASONS, Refusal
from takfl.wire.signing import object_ref
from takfl.wire.topics import Down, Up
from takfl.wire_vectors.fixed import (
    AGENT,
    AGENT_SIDE,
    COORDINATOR,
    NEWER_MINOR,
    OTHER_MAJOR,
    SECRET,
    SENT_AT,
    Vector,
    nonce_for,
    object_vector,
    signed_vector,
    stamped,
)
from takfl.wire_vectors.round import TOPICS

# JSON texts as some sender may write them, and their canonical form (protocol.md,
# "Canonical JSON"): every float rule, escapes, key order by code point.
CANONICAL_INPUTS = (
    "5e-5",
    "0.00005",
    "0.0001",
    "1E16",
    "1e+16",
    "9999999999999998.0",
    "1.5e-07",
    "-0.0",
    "0.0",
    "600",
    "600.0",
    "600.00",
    "6e2",
    "0.1",
    "0.30000000000000004",
    "1.7976931348623157e308",
    "5e-324",
    "-123456789012345.67",
    "9007199254740993",
    '"caf\\u00e9 \\ud83d\\ude00 \\u0001 \\u007f / \\" \\\\ \\t"',
    '"café 😀"',
    '{"b": 1, "a": [true, false, null], "é": {}, "ｚ": [], "😀": "x", "Z": 0.5}',
)
WRONG_PASSWORD_NOTE = (
    "the key is the 32 bytes the secret's hex decodes to; HMAC keyed with the 64 ASCII "
    "characters gives this other value, which the broker refuses"
)


def canonical_cases() -> list[dict[str, str]]:
    """``{"input", "canonical"}`` pairs: what a receiver parses, what it signs."""
    return [
        {"input": text, "canonical": canonical_bytes(parse_json(text)).decode()}
        for text in CANONICAL_INPUTS
    ]


def metrics_update(update: Vector) -> Vector:
    """The fp16 update with metrics whose floats take every canonical form and whose keys
    are non-ASCII (sorted by code point: "ｚ" U+FF5A before "😀" U+1F600, the reverse of
    UTF-16 order)."""
    header = UpdateHeader.model_validate_json(canonical_bytes(update.obj))
    metrics = {
        "train_loss": 0.5,
        "weight_decay": 5e-05,
        "big": 1e16,
        "tiny": 1.5e-07,
        "neg_zero": -0.0,
        "integral": 600.0,
        "é": 1.0,
        "ｚ": 2.0,
        "😀": 3.0,
    }
    edited = stamped(header.model_copy(update={"metrics": metrics}), "update-metrics", 61)
    return signed_vector(edited, TOPICS.up(AGENT, Up.UPDATE), AGENT_SIDE)


def registration_variants(registration: Vector) -> dict[str, Vector]:
    """The registration with ``telemetry`` omitted (the vector ``registration`` has it
    present and null), and as a native sender writes it."""
    topic = TOPICS.up(AGENT, Up.REGISTER)
    body = {k: v for k, v in registration.obj.items() if k not in ("signature", "telemetry")}
    omitted = {**body, "nonce": nonce_for("registration-omitted")}
    native = {**body, "nonce": nonce_for("registration-native"), "sent_at": int(SENT_AT)}
    signed = object_vector(native, topic, AGENT_SIDE).obj
    # keys in the order the sender had them, spaces, the signature first, an integer token
    # in a float field: the receiver signs what it received, rebuilt canonically
    text = (
        "{\n  "
        + ",\n  ".join(
            f"{json.dumps(k)}: {json.dumps(signed[k], ensure_ascii=False)}"
            for k in ("signature", *sorted(native, reverse=True))
        )
        + "\n}\n"
    )
    return {
        "registration-omitted": object_vector(
            omitted, topic, AGENT_SIDE, note="telemetry omitted: the same as null"
        ),
        "registration-native": object_vector(
            native,
            topic,
            AGENT_SIDE,
            wire=text.encode(),
            note="written by a native sender: any key order, whitespace, sent_at as an "
            "integer token (kept as such in the signed bytes)",
        ),
    }


def version_vectors(registration: Vector) -> dict[str, Vector]:
    """A registration of protocol 1.1 (a later minor: extra fields, nested too, read
    leniently), one of 2.0 (another major: not read), and the coordinator's refusal of the
    latter (the one message every major reads)."""
    topic = TOPICS.up(AGENT, Up.REGISTER)
    body = {k: v for k, v in registration.obj.items() if k != "signature"}
    minor = {
        **body,
        "protocol": "1.1",
        "nonce": nonce_for("registration-1.1"),
        "battery_pct": 87.5,
        "telemetry": {"bytes_sent": 0, "charging": True},
    }
    major = {**body, "protocol": "2.0", "nonce": nonce_for("registration-2.0"), "tier": "x"}
    newer = object_vector(
        minor, topic, AGENT_SIDE, reads=NEWER_MINOR, note="unknown keys ignored, still signed"
    )
    other = object_vector(
        major, topic, AGENT_SIDE, reads=OTHER_MAJOR, note="refused unsupported_version"
    )
    refusal = {
        "protocol": "1.0",
        "kind": "ack",
        "run": "",
        "sent_at": SENT_AT + 30,
        "nonce": nonce_for("ack-register-unsupported-version"),
        "subject": "register",
        "agent_id": AGENT,
        "round_id": None,
        "digest": object_ref(other.obj),
        "accepted": False,
        "reason": Refusal.UNSUPPORTED_VERSION.value,
        "detail": "agent speaks protocol 2.0; this coordinator speaks protocol 1.0 "
        "(and reads any 1.x)",
    }
    return {
        "registration-1.1": newer,
        "registration-2.0": other,
        "ack-register-unsupported-version": object_vector(
            refusal, TOPICS.down(AGENT, Down.ACK), COORDINATOR, note="read by every major"
        ),
    }


def broker_password() -> dict[str, str]:
    """The agent's broker password from its secret (``takfl.mqtt.credentials``)."""
    wrong = hmac.new(SECRET.hex().encode(), b"takfl-mqtt-password-v1", hashlib.sha256)
    return {
        "secret_hex": SECRET.hex(),
        "label": "takfl-mqtt-password-v1",
        "password": mqtt_password(SECRET),
        "not_this": wrong.hexdigest()[:32],
        "note": WRONG_PASSWORD_NOTE,
    }


def freshness_cases() -> dict[str, Any]:
    """The replay window and what a receiver decides at ``now`` for a message sent at
    ``sent_at`` whose nonce it has not seen (a nonce seen before: ``replayed``)."""
    w = DEFAULT_WINDOW_S
    cases = [
        (SENT_AT, SENT_AT, "ok"),
        (SENT_AT + w, SENT_AT, "ok"),
        (SENT_AT + w + 0.5, SENT_AT, Refusal.STALE_MESSAGE.value),
        (SENT_AT - w, SENT_AT, "ok"),
        (SENT_AT - w - 0.5, SENT_AT, Refusal.STALE_MESSAGE.value),
    ]
    return {
        "window_s": w,
        "cases": [{"now": n, "sent_at": s, "verdict": v} for n, s, v in cases],
        "seen_again": Refusal.REPLAYED.value,
    }


def reasons() -> list[str]:
    """Every value ``ack.reason`` and ``release_report.reason`` may take."""
    return list(REASONS)
