"""The vectors' fixed inputs (a secret, a run, times, tensors) and how a vector becomes
files: every value here is constant, so the files are byte-for-byte reproducible."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from takfl.wire.canonical import canonical_bytes
from takfl.wire.envelope import SignedMessage, signed_part
from takfl.wire.messages import encode_message
from takfl.wire.signing import DOMAIN, hmac_hex

SECRET = bytes(range(32))  # the vectors' agent secret (never a real one)
AGENT, PROTOTYPE, ROUND = "S-000", "S", 3
RUN = "52756e2d6f662d7468652d766563746f"  # the vectors' run id (32 hex digits)
OTHER_RUN = "4f6c642d72756e2d6f662d766563746f"  # a run of another coordinator start
CHUNK_SIZE = 256  # small, so the vectors have several chunks
SENT_AT = 1_767_225_600.0  # 2026-01-01T00:00:00Z
FLEET = "demo"  # the vectors' fleet name (topics)
COORDINATOR_ID = "coordinator"  # agent_id of the coordinator's own status
AGENT_KEY = "agent secret"  # HMAC-SHA256 under the agent's per-device secret
UNSIGNED = "unsigned"  # signature "", for monitors; agents never act on these
COORDINATOR, AGENT_SIDE = "coordinator", "agent"  # a vector's sender
NUM_SAMPLES = 120  # the vectors' agent's shard size
# A stand-in for an ExecuTorch training program (.pte): any bytes travel the same way.
PROGRAM = b"ET12 stand-in training program, not a real .pte: " + bytes(range(256)) * 2
# How a receiver reads a vector's message (the version rule of takfl.wire.version).
STRICT, NEWER_MINOR, OTHER_MAJOR = "strict", "newer_minor", "other_major"

Files = dict[str, bytes]  # vector file name -> its bytes


def nonce_for(name: str) -> str:
    """The fixed nonce of vector ``name`` (32 hex digits)."""
    return hashlib.sha256(f"takfl vector nonce {name}".encode()).hexdigest()[:32]


def stamp(name: str, offset: float = 0.0, run: str = RUN) -> dict[str, Any]:
    """The envelope values of vector ``name``: its run, ``SENT_AT + offset``, its nonce."""
    return {"run": run, "sent_at": SENT_AT + offset, "nonce": nonce_for(name)}


def stamped(message: SignedMessage, name: str, offset: float = 0.0) -> SignedMessage:
    """``message`` with the fixed envelope of vector ``name`` (unsigned)."""
    fresh = stamp(name, offset, run=message.run)
    return message.model_copy(update={**fresh, "signature": ""})


def as_json(value: Any) -> bytes:
    """Pretty JSON (manifest, schemas)."""
    return (json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


@dataclass(frozen=True, kw_only=True)
class Vector:
    """One message vector: its JSON object (signature included), the bytes it travels as
    (its canonical JSON, unless a native sender wrote it otherwise), where it travels and
    how a 1.0 receiver reads it."""

    obj: dict[str, Any]
    wire: bytes
    topic: str
    sender: str
    key: str  # AGENT_KEY or UNSIGNED
    reads: str = STRICT  # STRICT, NEWER_MINOR or OTHER_MAJOR
    note: str = ""

    @property
    def kind(self) -> str:
        return str(self.obj["kind"])

    @property
    def signed_bytes(self) -> bytes:
        """``DOMAIN`` followed by the canonical bytes of the object without its signature."""
        return DOMAIN + signed_part(self.obj)

    def files(self, name: str) -> Files:
        """``<name>.json`` and, when signed, ``<name>.signed-bytes.bin``."""
        out = {f"{name}.json": self.wire}
        if self.key != UNSIGNED:
            out[f"{name}.signed-bytes.bin"] = self.signed_bytes
        return out

    def entry(self, name: str) -> dict[str, Any]:
        """The manifest's description of this vector."""
        signed = self.key != UNSIGNED
        return {
            "kind": self.kind,
            "file": f"{name}.json",
            "topic": self.topic,
            "sender": self.sender,
            "key": self.key,
            "signed_bytes": f"{name}.signed-bytes.bin" if signed else None,
            "signature": self.obj.get("signature", ""),
            "object": self.obj,
            "canonical_wire": self.wire == canonical_bytes(self.obj),
            "reads": self.reads,
            "note": self.note,
        }


def signed_vector(message: SignedMessage, topic: str, sender: str) -> Vector:
    """A vector of ``message`` (already stamped) signed with the agent's secret."""
    signed = message.model_copy(update={"signature": hmac_hex(SECRET, message.signing_payload())})
    return Vector(
        obj=signed.wire_object(),
        wire=encode_message(signed),
        topic=topic,
        sender=sender,
        key=AGENT_KEY,
    )


def unsigned_vector(message: SignedMessage, topic: str) -> Vector:
    """A vector of ``message`` as the coordinator sends it to monitors: no signature."""
    return Vector(
        obj=message.wire_object(),
        wire=encode_message(message),
        topic=topic,
        sender=COORDINATOR,
        key=UNSIGNED,
    )


def object_vector(
    obj: dict[str, Any],
    topic: str,
    sender: str,
    *,
    wire: bytes | None = None,
    reads: str = STRICT,
    note: str = "",
) -> Vector:
    """A vector of a hand-made JSON object (``signature`` set here), sent as ``wire``
    (default: its canonical bytes)."""
    body = {k: v for k, v in obj.items() if k != "signature"}
    full = {**body, "signature": hmac_hex(SECRET, signed_part(body))}
    return Vector(
        obj=full,
        wire=canonical_bytes(full) if wire is None else wire,
        topic=topic,
        sender=sender,
        key=AGENT_KEY,
        reads=reads,
        note=note,
    )


# -- tensors -------------------------------------------------------------------------------------
def global_state() -> dict[str, torch.Tensor]:
    """A tiny model: Linear(4 -> 3) with a BatchNorm counter (an exact integer tensor)."""
    weight = (torch.arange(12, dtype=torch.float32).reshape(3, 4) - 5.5) / 8
    return {
        "fc.weight": weight,
        "fc.bias": torch.tensor([0.25, -0.5, 0.125]),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }


def trained_state() -> dict[str, torch.Tensor]:
    """The global model after 'training': a fixed change of every float tensor."""
    g = global_state()
    step = torch.linspace(-1.0, 1.0, 12).reshape(3, 4) / 100
    return {
        "fc.weight": g["fc.weight"] + step,
        "fc.bias": g["fc.bias"] + torch.tensor([0.003, -0.001, 0.0]),
        "bn.num_batches_tracked": torch.tensor(9, dtype=torch.int64),
    }


def tensors(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``{name: {"shape", "values"}}`` of a state dict, for the manifest."""
    return {k: {"shape": list(v.shape), "values": v.flatten().tolist()} for k, v in state.items()}
