"""Protocol 1.0's pure units: canonical JSON, the envelope, the version rule, freshness,
the enumerated reasons. Bytes and objects in, decisions out; no broker."""

from __future__ import annotations

import json
import math
import random
import struct
from typing import Any

import pytest

from takfl.wire.canonical import canonical_bytes, format_float, parse_json
from takfl.wire.envelope import ENVELOPE
from takfl.wire.errors import MalformedMessage, UnsupportedVersion
from takfl.wire.freshness import FreshnessPolicy, ReplayGuard, new_nonce
from takfl.wire.messages import Ack, Registration, Status, decode_message, encode_message
from takfl.wire.reasons import Refusal
from takfl.wire.signing import generate_secret, hmac_hex, restamp, sign, verify
from takfl.wire.version import Compatibility, compatibility, parse_version

SECRET = generate_secret()


# -- canonical JSON ------------------------------------------------------------------------------
def random_float(rng: random.Random) -> float:
    kind = rng.random()
    if kind < 0.3:  # any double
        x = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        return x if math.isfinite(x) else 0.5
    if kind < 0.6:
        return rng.uniform(-1, 1) * 10 ** rng.randint(-12, 20)
    return float(rng.choice([0.0, -0.0, 600.0, 5e-05, 1e16, 1e-4, 9999999999999998.0]))


def random_string(rng: random.Random) -> str:
    alphabet = ['"', "\\", "/", "\n", "\x01", "\x7f", "a", "é", "ｚ", "😀", "\u2028", " "]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))


def random_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randint(0, 7 if depth < 3 else 4)
    if choice == 0:
        return rng.choice([None, True, False])
    if choice == 1:
        return rng.randint(-(2**53), 2**53)
    if choice == 2:
        return random_float(rng)
    if choice in (3, 4):
        return random_string(rng)
    if choice == 5:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_string(rng): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def test_canonical_is_a_fixed_point_and_keeps_ints_and_floats_apart() -> None:
    # Prepare
    rng = random.Random(20)
    for _ in range(2000):
        value = random_value(rng)
        # Execute
        once = canonical_bytes(value)
        again = canonical_bytes(parse_json(once))
        # Assert: parse(canonical(x)) canonicalises to the same bytes; ints stay ints
        assert again == once
        assert once.isascii()
        assert parse_json(once) == value or _has_negative_zero(value)


def _has_negative_zero(value: Any) -> bool:
    return "-0.0" in json.dumps(value)


@pytest.mark.parametrize(
    ("x", "text"),
    [
        (5e-05, "5e-05"),
        (0.0001, "0.0001"),
        (1e16, "1e+16"),
        (9999999999999998.0, "9999999999999998.0"),
        (1.5e-07, "1.5e-07"),
        (-0.0, "-0.0"),
        (600.0, "600.0"),
        (0.1 + 0.2, "0.30000000000000004"),
        (1e22, "1e+22"),
        (5e-324, "5e-324"),
    ],
)
def test_float_rule(x: float, text: str) -> None:
    assert format_float(x) == text
    assert canonical_bytes({"x": x}) == f'{{"x":{text}}}'.encode()


def test_integer_tokens_stay_integers_and_float_tokens_floats() -> None:
    assert canonical_bytes(parse_json(b'{"a": 600, "b": 600.0, "c": 6e2, "d": -0}')) == (
        b'{"a":600,"b":600.0,"c":600.0,"d":0}'
    )


@pytest.mark.parametrize(
    "data",
    [
        b'{"a": 1, "a": 2}',  # duplicate key
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": 1e400}',  # overflows to infinity
        b'{"a": "\\ud800"}',  # a lone surrogate
        b'"\xff"',  # not UTF-8
        b"[" * 100_000,  # nested past any sane depth
    ],
)
def test_what_has_no_canonical_form_is_refused(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        parse_json(data)


def test_keys_sort_by_code_point_not_utf16() -> None:
    # "ｚ" is U+FF5A, "😀" U+1F600 (a surrogate pair, 0xD83D..., in UTF-16)
    assert canonical_bytes({"😀": 1, "ｚ": 2, "a": 3}) == (
        b'{"a":3,"\\uff5a":2,"\\ud83d\\ude00":1}'
    )


# -- the envelope --------------------------------------------------------------------------------
def registration(**changes: Any) -> Registration:
    base = Registration(
        agent_id="a1", prototype="S", profile="p", hardware_class="phone", num_samples=3
    )
    return sign(base.model_copy(update=changes), SECRET)


def test_every_envelope_key_is_required_on_the_wire() -> None:
    wire = json.loads(encode_message(registration()))
    assert set(ENVELOPE) <= set(wire)
    for key in ENVELOPE:
        partial = {k: v for k, v in wire.items() if k != key}
        with pytest.raises(MalformedMessage, match=key if key != "protocol" else "protocol"):
            decode_message(Registration, json.dumps(partial).encode())


def test_the_signature_covers_the_object_as_received() -> None:
    # Prepare: a native sender writes an integer token for a float and omits an option
    msg = json.loads(encode_message(registration()))
    del msg["telemetry"]
    msg["sent_at"] = int(msg["sent_at"])
    body = {k: v for k, v in msg.items() if k != "signature"}
    msg["signature"] = hmac_hex(SECRET, canonical_bytes(body))
    data = json.dumps(msg, indent=1).encode()  # not canonical either
    # Execute
    decoded = decode_message(Registration, data)
    # Assert: verified over what arrived; its model holds the float and the default
    assert verify(decoded, SECRET)
    assert isinstance(decoded.sent_at, float) and decoded.telemetry is None
    assert encode_message(decoded) == canonical_bytes(msg)


def test_a_higher_minor_is_read_leniently_and_another_major_not_at_all() -> None:
    # Prepare
    obj = json.loads(encode_message(registration()))
    newer = {**obj, "protocol": "1.7", "extra": {"x": 1}, "telemetry": {"retries": 2, "y": 3}}
    newer["signature"] = hmac_hex(
        SECRET, canonical_bytes({k: v for k, v in newer.items() if k != "signature"})
    )
    # Execute
    decoded = decode_message(Registration, canonical_bytes(newer))
    # Assert: unknown keys ignored (nested too), still verified over every key
    assert decoded.telemetry is not None and decoded.telemetry.retries == 2
    assert verify(decoded, SECRET)
    with pytest.raises(UnsupportedVersion):
        decode_message(Registration, canonical_bytes({**obj, "protocol": "2.0"}))
    with pytest.raises(MalformedMessage):  # strict at the same minor
        decode_message(Registration, canonical_bytes({**obj, "extra": 1}))
    with pytest.raises(MalformedMessage, match="protocol"):  # from before 1.0
        decode_message(Registration, canonical_bytes({**obj, "protocol": 1}))


def test_a_reason_added_by_a_later_minor_is_accepted_only_from_it() -> None:
    ack = Ack(subject="task", agent_id="a1", digest="ab" * 32, accepted=False, reason="too_large")
    obj = json.loads(encode_message(ack)) | {"reason": "battery_low"}
    with pytest.raises(MalformedMessage, match="reason"):
        decode_message(Ack, canonical_bytes(obj))
    assert decode_message(Ack, canonical_bytes({**obj, "protocol": "1.1"})).reason == "battery_low"


def test_restamp_is_the_same_content_signed_anew() -> None:
    first = registration()
    again = restamp(first, SECRET, now=first.sent_at + 15)
    assert again.nonce != first.nonce and again.sent_at == first.sent_at + 15
    assert again.content_ref() == first.content_ref() and verify(again, SECRET)
    assert restamp(first, SECRET).signature != first.signature


def test_messages_built_here_carry_this_version_and_fresh_nonces() -> None:
    a, b = (
        Status(agent_id="a1", state="online", time=1.0),
        Status(agent_id="a1", state="online", time=1.0),
    )
    assert a.protocol == "1.0" and a.nonce != b.nonce and len(a.nonce) == 32


# -- versions ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("theirs", "ours", "how"),
    [
        ("1.0", "1.0", Compatibility.STRICT),
        ("1.0", "1.3", Compatibility.STRICT),
        ("1.4", "1.3", Compatibility.NEWER_MINOR),
        ("2.0", "1.9", Compatibility.OTHER_MAJOR),
        ("0.9", "1.0", Compatibility.OTHER_MAJOR),
    ],
)
def test_version_rule(theirs: str, ours: str, how: Compatibility) -> None:
    assert compatibility(theirs, ours) is how


@pytest.mark.parametrize("text", ["1", "1.0.0", "01.0", "1.00", "v1.0", "", "1.-1"])
def test_malformed_versions_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_version(text)


# -- freshness -----------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_stale_and_replayed_messages_are_refused_by_name() -> None:
    # Prepare
    clock = Clock()
    guard = ReplayGuard(FreshnessPolicy(window_s=300.0), clock=clock)
    nonce = new_nonce()
    # Execute / Assert
    assert guard.check("a1", clock.now - 299, nonce).accepted
    assert guard.check("a1", clock.now, nonce).reason is Refusal.REPLAYED
    assert guard.check("a2", clock.now, nonce).accepted  # per sender
    assert guard.check("a1", clock.now - 301, new_nonce()).reason is Refusal.STALE_MESSAGE
    assert guard.check("a1", clock.now + 301, new_nonce()).reason is Refusal.STALE_MESSAGE


def test_nonces_are_forgotten_only_when_the_window_refuses_them_anyway() -> None:
    # Prepare
    clock = Clock()
    guard = ReplayGuard(FreshnessPolicy(window_s=300.0, max_nonces=3), clock=clock)
    sent = [(clock.now - 10 + i, new_nonce()) for i in range(4)]
    # Execute: the fourth pushes the first out of the bounded set
    assert all(guard.check("a1", t, n).accepted for t, n in sent)
    # Assert: the forgotten one is still refused (the floor), the set stays bounded
    assert guard.check("a1", *sent[0]).reason is Refusal.STALE_MESSAGE
    assert guard.check("a1", *sent[3]).reason is Refusal.REPLAYED
    assert guard.remembered("a1") == 3
    clock.now += 400  # everything older than the window is dropped
    assert guard.check("a1", clock.now, new_nonce()).accepted and guard.remembered("a1") == 1
