"""docs/protocol.md read as an outside implementer reads it: every vector's canonical bytes
and HMAC rebuilt from manifest.json with only json, hmac, hashlib and struct (and, for
secure aggregation, the primitives it names from ``cryptography``), by code
written from the document alone (the canonical JSON rules, the float rule, the password
derivation, message references, the replay window, chunks and the safetensors layout).
Nothing from the project is imported here: if a rule of the document were missing or
wrong, these checks could not be written or would fail."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path
from typing import Any

import pytest

VEC = Path(__file__).resolve().parent.parent / "docs" / "protocol" / "vectors"
DOMAIN = b"takfl-wire-v1\x00"
SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}
SAFETENSORS_ORDER = ["I64", "F32", "I32", "F16", "I16", "I8", "U8", "BOOL"]


def manifest() -> dict[str, Any]:
    return json.loads((VEC / "manifest.json").read_text())


# -- canonical JSON, as docs/protocol.md states it ------------------------------------------------
def shortest_digits(x: float) -> tuple[str, int]:
    """The shortest decimal digits that read back as ``x`` (the closest at that length)
    and the decimal exponent of the first digit: (digits, exponent)."""
    for precision in range(17):
        text = f"{abs(x):.{precision}e}"
        if float(text) == abs(x):
            mantissa, exp = text.split("e")
            return mantissa.replace(".", "").rstrip("0") or "0", int(exp)
    raise AssertionError(x)


def float_text(x: float) -> str:
    """Positional with at least one fractional digit for 1e-4 <= |x| < 1e16 (and zero),
    else d[.ddd]e±XX with at least two exponent digits."""
    sign = "-" if str(x).startswith("-") else ""  # -0.0 keeps its sign
    if x == 0:
        return f"{sign}0.0"
    digits, exp = shortest_digits(x)
    if -4 <= exp < 16:
        if exp >= 0:
            whole = digits[: exp + 1].ljust(exp + 1, "0")
            frac = digits[exp + 1 :] or "0"
        else:
            whole, frac = "0", "0" * (-exp - 1) + digits
        return f"{sign}{whole}.{frac}"
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{sign}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"


def string_text(s: str) -> str:
    out = []
    for ch in s:
        if ch in SHORT_ESCAPES:
            out.append(SHORT_ESCAPES[ch])
        elif " " <= ch <= "~":
            out.append(ch)
        elif ord(ch) > 0xFFFF:
            v = ord(ch) - 0x10000
            out.append(f"\\u{0xD800 + (v >> 10):04x}\\u{0xDC00 + (v & 0x3FF):04x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    return '"' + "".join(out) + '"'


def canonical(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return float_text(value)
    if isinstance(value, str):
        return string_text(value)
    if isinstance(value, list):
        return "[" + ",".join(canonical(v) for v in value) + "]"
    items = sorted(value.items())  # by code point
    return "{" + ",".join(f"{string_text(k)}:{canonical(v)}" for k, v in items) + "}"


def signed_bytes(obj: dict[str, Any]) -> bytes:
    return DOMAIN + canonical({k: v for k, v in obj.items() if k != "signature"}).encode()


# -- the checks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", manifest()["canonical"], ids=lambda c: c["input"][:24])
def test_canonical_cases(case: dict[str, str]) -> None:
    assert canonical(json.loads(case["input"])) == case["canonical"]


@pytest.mark.parametrize("name", sorted(manifest()["messages"]))
def test_every_message_is_rebuilt_from_the_manifest(name: str) -> None:
    m = manifest()
    entry = m["messages"][name]
    obj = entry["object"]
    wire = (VEC / entry["file"]).read_bytes()
    # what travels: canonical JSON with the signature, or what a native sender wrote
    assert json.loads(wire) == obj
    if entry["canonical_wire"]:
        assert wire == canonical(obj).encode()
    assert obj["kind"] == entry["kind"]
    assert {"protocol", "kind", "run", "sent_at", "nonce", "signature"} <= set(obj)
    if entry["key"] == "unsigned":
        assert obj["signature"] == "" and entry["signed_bytes"] is None
        return
    signed = signed_bytes(obj)
    assert signed == (VEC / entry["signed_bytes"]).read_bytes()
    secret = bytes.fromhex(m["secret_hex"])
    assert hmac.new(secret, signed, hashlib.sha256).hexdigest() == obj["signature"]


def test_registration_reference_and_acks() -> None:
    m = manifest()
    reg = m["messages"]["registration"]["object"]
    ref = hashlib.sha256(signed_bytes(reg)[len(DOMAIN) :] + reg["signature"].encode())
    assert ref.hexdigest() == m["registration_message_ref"]
    assert m["messages"]["ack-register"]["object"]["digest"] == ref.hexdigest()
    other = m["messages"]["registration-2.0"]["object"]
    refusal = m["messages"]["ack-register-unsupported-version"]["object"]
    other_ref = hashlib.sha256(signed_bytes(other)[len(DOMAIN) :] + other["signature"].encode())
    assert refusal["digest"] == other_ref.hexdigest()
    assert refusal["reason"] == "unsupported_version" and refusal["accepted"] is False


def test_broker_password_is_hmac_of_the_label_under_the_decoded_secret() -> None:
    p = manifest()["broker_password"]
    key = bytes.fromhex(p["secret_hex"])  # the 32 decoded bytes, not the 64 characters
    assert hmac.new(key, p["label"].encode(), hashlib.sha256).hexdigest()[:32] == p["password"]
    ascii_key = p["secret_hex"].encode()
    assert (
        hmac.new(ascii_key, p["label"].encode(), hashlib.sha256).hexdigest()[:32] == p["not_this"]
    )
    assert p["password"] != p["not_this"]


def test_replay_window() -> None:
    f = manifest()["freshness"]
    for case in f["cases"]:
        fresh = abs(case["now"] - case["sent_at"]) <= f["window_s"]
        assert ("ok" if fresh else "stale_message") == case["verdict"], case


def test_every_reason_of_the_vectors_is_enumerated() -> None:
    m = manifest()
    reasons = set(m["reasons"])
    for entry in m["messages"].values():
        if "reason" in entry["object"]:
            assert entry["object"]["reason"] in reasons or entry["reads"] != "strict"
    assert {"ok", "unsupported_version", "other_run", "replayed", "stale_message"} <= reasons
    assert {"codec_mismatch", "run_finished"} <= reasons


def chunks(prefix: str) -> dict[int, tuple[bytes, int, bytes]]:
    out = {}
    for path in sorted(VEC.glob(f"{prefix}.chunk-*.bin")):
        data = path.read_bytes()
        magic, version, digest, index, count = struct.unpack(">3sB32sII", data[:44])
        assert (magic, version) == (b"TKC", 1)
        out[index] = (digest, count, data[44:])
    return out


@pytest.mark.parametrize("prefix", ["global", "update-fp32", "update-fp16", "update-int8"])
def test_chunks_and_safetensors_layout(prefix: str) -> None:
    m = manifest()
    parts = chunks(prefix)
    blob = b"".join(parts[i][2] for i in range(len(parts)))
    assert blob == (VEC / f"{prefix}.safetensors").read_bytes()
    assert {p[0] for p in parts.values()} == {hashlib.sha256(blob).digest()}
    assert {p[1] for p in parts.values()} == {len(parts)}
    assert all(len(p[2]) == m["chunk_size"] for i, p in parts.items() if i < len(parts) - 1)
    # safetensors: u64 LE header length (a multiple of 8, padded with spaces), the JSON
    # header with __metadata__ first, tensors by dtype order then name, data back to back
    (n,) = struct.unpack("<Q", blob[:8])
    header = blob[8 : 8 + n]
    assert n % 8 == 0 and header == header.rstrip(b" ") + b" " * (n - len(header.rstrip(b" ")))
    entries = json.loads(header)
    keys = list(entries)
    mode = "fp32" if prefix == "global" else prefix.split("-")[1]
    assert keys[0] == "__metadata__" and entries["__metadata__"] == {"takfl.codec": f"1:{mode}"}
    tensors = keys[1:]
    rank = {name: (SAFETENSORS_ORDER.index(entries[name]["dtype"]), name) for name in tensors}
    assert tensors == sorted(tensors, key=lambda t: rank[t])
    offset = 0
    for name in tensors:
        assert list(entries[name]) == ["dtype", "shape", "data_offsets"]
        begin, end = entries[name]["data_offsets"]
        assert begin == offset
        offset = end
    assert 8 + n + offset == len(blob)


def test_int8_rule_with_float32_division() -> None:
    import numpy as np  # the arithmetic of the rule: float32 throughout

    m = manifest()
    blob = (VEC / "update-int8.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    entries, data = json.loads(blob[8 : 8 + n]), blob[8 + n :]
    for name, spec in m["global"]["tensors"].items():
        if name.endswith("num_batches_tracked"):
            continue
        delta = np.float32(m["trained"][name]["values"]) - np.float32(spec["values"])
        scale = np.float32(np.abs(delta).max()) / np.float32(127)
        q = np.clip(np.round(delta / scale), -127, 127).astype(np.int8)  # half to even
        s0, s1 = entries[name + ".__scale__"]["data_offsets"]
        q0, q1 = entries[name]["data_offsets"]
        assert data[s0:s1] == scale.astype("<f4").tobytes()
        assert data[q0:q1] == q.tobytes()


# -- secure aggregation, as docs/protocol.md states it ---------------------------------------------
# The maths needs the primitives it names (X25519, HKDF-SHA256, AES-CTR, AES-GCM), taken
# from ``cryptography`` as an implementer would; still nothing from the project.
def test_a_secure_rounds_masked_inputs_and_sum_are_rebuilt_from_the_manifest() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    m = manifest()
    s = m["secagg"]
    run, rnd, proto = m["run"], s["context_text"].split("|")[2], s["context_text"].split("|")[3]
    context = hashlib.sha256(f"takfl-secagg-1|{run}|{rnd}|{proto}".encode()).digest()
    assert context.hex() == s["context_hex"]
    n, bits, clip = len(s["clients"]), s["bits"], s["clip_norm"]
    frac = bits - 2
    while n * (clip * 2**frac + 0.5) >= 2 ** (bits - 1):
        frac -= 1
    assert frac == s["frac_bits"]
    modulus = 2**bits

    def private(name: str, which: str) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(bytes.fromhex(s["keys"][name][which]))

    def kdf(mine: X25519PrivateKey, theirs: X25519PrivateKey, info: bytes) -> bytes:
        shared = mine.exchange(theirs.public_key())
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=context, info=info).derive(shared)

    def prg(seed: bytes, count: int) -> list[int]:
        enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
        stream = enc.update(b"\0" * (count * bits // 8)) + enc.finalize()
        width = bits // 8
        return [
            int.from_bytes(stream[i : i + width], "little") for i in range(0, len(stream), width)
        ]

    total = [0] * len(s["inputs"][s["clients"][0]])
    for me in s["clients"]:
        x = s["inputs"][me]
        norm = sum(v * v for v in x) ** 0.5
        clipped = [v * (clip / norm) if norm > clip else v for v in x]
        assert clipped == pytest.approx(s["clipped"][me], abs=1e-12)
        words = [round(v * 2**frac) % modulus for v in clipped]  # round(): ties to even
        assert words == s["encoded_words"][me]
        masked = [
            (w + p) % modulus
            for w, p in zip(
                words, prg(bytes.fromhex(s["keys"][me]["self_mask_seed_hex"]), len(x)), strict=True
            )
        ]
        for other in s["clients"]:
            if other == me:
                continue
            seed = kdf(
                private(me, "mask_private_hex"),
                private(other, "mask_private_hex"),
                b"takfl-secagg/v1 pairwise mask",
            )
            sign = 1 if other > me else -1
            masked = [
                (w + sign * p) % modulus for w, p in zip(masked, prg(seed, len(x)), strict=True)
            ]
        assert masked == s["masked_words"][me], me
        total = [(t + w) % modulus for t, w in zip(total, masked, strict=True)]
    if s["clients"][0] == "S-000":  # the vectors' agent: its masked input is the update blob
        blob = (VEC / s["masked_input_blob"]).read_bytes()
        assert blob == b"".join(w.to_bytes(bits // 8, "little") for w in s["masked_words"]["S-000"])
    for me in s["clients"]:  # unmasking: every survivor's self mask comes off
        for i, p in enumerate(prg(bytes.fromhex(s["keys"][me]["self_mask_seed_hex"]), len(total))):
            total[i] = (total[i] - p) % modulus
    decoded = [(t - modulus if t >= modulus // 2 else t) / 2**frac for t in total]
    assert decoded == pytest.approx(s["sum"], abs=1e-12)
    # a sealed share of the vectors' agent opens with the channel key the document derives
    shares = m["messages"]["secagg-shares"]["object"]["shares"]
    for receiver, sealed_hex in shares.items():
        key = kdf(
            private("S-000", "channel_private_hex"),
            private(receiver, "channel_private_hex"),
            b"takfl-secagg/v1 share channel",
        )
        sealed = bytes.fromhex(sealed_hex)
        plain = AESGCM(key).decrypt(
            sealed[:12], sealed[12:], context + f"|S-000|{receiver}".encode()
        )
        assert len(plain) == 2 + 32 + 32 and int.from_bytes(plain[:2], "big") >= 1
