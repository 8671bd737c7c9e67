"""JSON Schemas of every wire message and golden test vectors, for native agents.

    python -m takfl.wire.vectors [--out docs/protocol]

writes ``schemas/<kind>.schema.json`` (one per message, generated from the pydantic
models) and ``vectors/`` (a task, a global-model blob and its chunks, an update in
each codec, and every control message an agent sends or receives: registrations,
acks, statuses, chunk requests, global announcements; each signed one with the exact
bytes its signature covers), plus ``vectors/manifest.json`` describing every file and
naming, for each message, its topic, its sender and the key that signs it.
Everything is deterministic: a fixed secret, fixed tensors and fixed times, so the
files are byte-for-byte reproducible and the tests regenerate and compare them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from takfl.wire.chunking import blob_ref, split
from takfl.wire.codec import decode_state, encode_state
from takfl.wire.messages import (
    COMPRESSIONS,
    Ack,
    AckSubject,
    ChunkRequest,
    GlobalAnnouncement,
    ModelRef,
    Registration,
    SignedMessage,
    Status,
    TaskMessage,
    TrainingRef,
    UpdateHeader,
    WireMessage,
    encode_chunk,
    encode_message,
)
from takfl.wire.signing import DOMAIN, message_ref, sign
from takfl.wire.telemetry import PlatformInfo, Telemetry
from takfl.wire.topics import Down, Topics, Up
from takfl.wire.update import prepare_update

MESSAGES: tuple[type[WireMessage], ...] = (
    Registration,
    TaskMessage,
    UpdateHeader,
    ChunkRequest,
    Ack,
    Status,
    GlobalAnnouncement,
)
SECRET = bytes(range(32))  # the vectors' agent secret (never a real one)
AGENT, PROTOTYPE, ROUND = "S-000", "S", 3
CHUNK_SIZE = 256  # small, so the vectors have several chunks
SENT_AT = 1_767_225_600.0  # 2026-01-01T00:00:00Z
FLEET = "demo"  # the vectors' fleet name (topics)
COORDINATOR_ID = "coordinator"  # agent_id of the coordinator's own status
AGENT_KEY = "agent secret"  # HMAC-SHA256 under the agent's per-device secret
UNSIGNED = "unsigned"  # signature "", for monitors; agents never act on these
# A stand-in for an ExecuTorch training program (.pte): any bytes travel the same way.
PROGRAM = b"ET12 stand-in training program, not a real .pte: " + bytes(range(256)) * 2
DEFAULT_OUT = Path("docs/protocol")


def message_kind(cls: type[WireMessage]) -> str:
    return str(cls.model_fields["kind"].default)


def schemas() -> dict[str, bytes]:
    """``<kind>.schema.json`` -> JSON Schema bytes of each wire message."""
    out = {}
    for cls in MESSAGES:
        schema = cls.model_json_schema(by_alias=True, mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"takfl-wire-v1/{message_kind(cls)}"
        out[f"{message_kind(cls)}.schema.json"] = _json(schema)
    return out


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


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


def _signed_parts(prefix: str, message: SignedMessage) -> dict[str, bytes]:
    payload = message.signing_payload()
    return {
        f"{prefix}.json": encode_message(message),
        f"{prefix}.signed-bytes.bin": DOMAIN + payload,
    }


def _chunks(prefix: str, blob: bytes) -> dict[str, bytes]:
    return {f"{prefix}.chunk-{c.index:03d}.bin": encode_chunk(c) for c in split(blob, CHUNK_SIZE)}


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {k: {"shape": list(v.shape), "values": v.flatten().tolist()} for k, v in state.items()}


def vectors() -> tuple[dict[str, bytes], dict[str, Any]]:
    """(file name -> bytes, manifest) of the golden vectors."""
    files: dict[str, bytes] = {}
    glob = encode_state(global_state(), "fp32")
    files["global.safetensors"] = glob
    files.update(_chunks("global", glob))
    task = sign(
        TaskMessage(
            round_id=ROUND,
            agent_id=AGENT,
            prototype=PROTOTYPE,
            model=ModelRef(builder="mlp_digits", args={"width": 8}),
            num_classes=3,
            input_shape=(1, 2, 2),
            seed=42,
            deadline=SENT_AT + 600,
            compression="fp16",
            chunk_size=CHUNK_SIZE,
            blob=blob_ref(glob, CHUNK_SIZE),
            training=TrainingRef(epochs=1, batch_size=8, optimizer="sgd", learning_rate=0.01),
        ),
        SECRET,
    )
    files.update(_signed_parts("task", task))
    registration = sign(
        Registration(
            agent_id=AGENT,
            prototype=PROTOTYPE,
            profile="android-phone",
            hardware_class="phone",
            num_samples=120,
            sent_at=SENT_AT,
        ),
        SECRET,
    )
    files.update(_signed_parts("registration", registration))
    updates: dict[str, Any] = {}
    fp16_update = None
    for codec in COMPRESSIONS:
        up = prepare_update(
            task,
            trained_state(),
            global_state(),
            secret=SECRET,
            num_samples=120,
            metrics={"train_loss": 0.5},
            compression=codec,  # type: ignore[arg-type]
        )
        files.update(_signed_parts(f"update-{codec}", up.header))
        fp16_update = up.header if codec == "fp16" else fp16_update
        files[f"update-{codec}.safetensors"] = up.blob
        files.update(_chunks(f"update-{codec}", up.blob))
        updates[codec] = {
            "header": f"update-{codec}.json",
            "signed_bytes": f"update-{codec}.signed-bytes.bin",
            "signature": up.header.signature,
            "blob": f"update-{codec}.safetensors",
            "chunks": len(split(up.blob, CHUNK_SIZE)),
            "decoded_delta": _tensors(decode_state(up.blob)),
        }
    assert fp16_update is not None
    files["program.pte"] = PROGRAM
    files.update(_chunks("program", PROGRAM))
    messages, entries = control_messages(task, registration, fp16_update)
    for name, (message, _topic, _sender, key) in messages.items():
        if key == UNSIGNED:
            files[f"{name}.json"] = encode_message(message)
        else:
            files.update(_signed_parts(name, message))
    manifest = {
        "description": "Golden vectors of the takfl wire protocol v1; see docs/protocol.md. "
        "Regenerate with: python -m takfl.wire.vectors",
        "secret_hex": SECRET.hex(),
        "signing_domain_hex": DOMAIN.hex(),
        "chunk_size": CHUNK_SIZE,
        "global": {
            "blob": "global.safetensors",
            "sha256": hashlib.sha256(glob).hexdigest(),
            "chunks": len(split(glob, CHUNK_SIZE)),
            "tensors": _tensors(global_state()),
        },
        "task": {
            "message": "task.json",
            "signed_bytes": "task.signed-bytes.bin",
            "signature": task.signature,
        },
        "registration": {
            "message": "registration.json",
            "signed_bytes": "registration.signed-bytes.bin",
            "signature": registration.signature,
        },
        "trained": _tensors(trained_state()),
        "updates": updates,
        "program": {
            "blob": "program.pte",
            "sha256": hashlib.sha256(PROGRAM).hexdigest(),
            "chunks": len(split(PROGRAM, CHUNK_SIZE)),
            "note": "stand-in bytes, not a real ExecuTorch program",
        },
        "registration_message_ref": message_ref(registration),
        "messages": entries,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
    }
    return files, manifest


Entry = tuple[SignedMessage, str, str, str]  # message, topic, sender, signing key


def control_messages(
    task: TaskMessage, registration: Registration, update: UpdateHeader
) -> tuple[dict[str, Entry], dict[str, Any]]:
    """Every message an agent sends or receives, by vector name: (message, topic, sender,
    key), and the manifest entries describing them (file, kind, topic, sender, key,
    signed bytes, signature).

    Every signed message, in either direction, is signed with the agent's own secret
    (``SECRET`` here); the coordinator holds no key of its own, so its presence and the
    broadcast copy of a global announcement are unsigned."""
    t = Topics(FLEET)
    program_task = sign(
        task.model_copy(update={"program": blob_ref(PROGRAM, CHUNK_SIZE), "signature": ""}),
        SECRET,
    )
    telemetry = Telemetry(
        platform=PlatformInfo(
            machine="aarch64",
            system="Android",
            release="14",
            cpus=8,
            runtimes={"executorch": "1.5.1"},
        ),
        threads=2,
        rss_limit_mb=768.0,
    )
    reg_telemetry = sign(
        registration.model_copy(update={"telemetry": telemetry, "signature": ""}), SECRET
    )
    ann = GlobalAnnouncement(
        round_id=ROUND, prototype=PROTOTYPE, digest=task.blob.digest, size=task.blob.size
    )
    program_ref = blob_ref(PROGRAM, CHUNK_SIZE)

    def agent_signed(message: SignedMessage) -> SignedMessage:
        return sign(message, SECRET)

    c, a = "coordinator", "agent"

    def ack(subject: AckSubject, digest: str, accepted: bool, sender: str, **more: Any) -> Entry:
        """An ack of ``subject`` sent by ``sender``, on the receiving side's ack topic."""
        msg = agent_signed(
            Ack(subject=subject, agent_id=AGENT, digest=digest, accepted=accepted, **more)
        )
        topic = t.down(AGENT, Down.ACK) if sender == c else t.up(AGENT, Up.ACK)
        return msg, topic, sender, AGENT_KEY

    messages: dict[str, Entry] = {
        "task-program": (program_task, t.down(AGENT, Down.TASK), c, AGENT_KEY),
        "registration-telemetry": (reg_telemetry, t.up(AGENT, Up.REGISTER), a, AGENT_KEY),
        "ack-register": ack("register", message_ref(registration), True, c),
        "ack-register-refused": ack(
            "register",
            message_ref(registration),
            False,
            c,
            reason="wrong_prototype",
            detail="S-000 is registered for prototype S, not M",
        ),
        "ack-task": ack("task", task.blob.digest, True, a, round_id=ROUND),
        "ack-task-refused": ack(
            "task", task.blob.digest, False, a, round_id=ROUND, reason="too_large"
        ),
        "ack-update": ack("update", update.blob.digest, True, c, round_id=ROUND),
        "ack-update-refused": ack(
            "update",
            update.blob.digest,
            False,
            c,
            round_id=ROUND,
            reason="stale_round",
            detail="round 3 is closed; the current round is 4",
        ),
        "status-online": (
            agent_signed(Status(agent_id=AGENT, state="online", time=SENT_AT)),
            t.up(AGENT, Up.STATUS),
            a,
            AGENT_KEY,
        ),
        "status-offline": (  # the last will armed on the connection of status-online
            agent_signed(Status(agent_id=AGENT, state="offline", time=SENT_AT)),
            t.up(AGENT, Up.STATUS),
            a,
            AGENT_KEY,
        ),
        "status-coordinator-online": (
            Status(agent_id=COORDINATOR_ID, state="online", time=SENT_AT),
            t.coordinator_status(),
            c,
            UNSIGNED,
        ),
        "status-coordinator-offline": (  # the coordinator's last will
            Status(agent_id=COORDINATOR_ID, state="offline", time=0.0),
            t.coordinator_status(),
            c,
            UNSIGNED,
        ),
        "chunk-request-global": (
            agent_signed(ChunkRequest(agent_id=AGENT, digest=task.blob.digest, missing=[1])),
            t.up(AGENT, Up.REQUEST),
            a,
            AGENT_KEY,
        ),
        "chunk-request-program": (
            agent_signed(
                ChunkRequest(
                    agent_id=AGENT,
                    digest=program_ref.digest,
                    missing=list(range(program_ref.count)),
                )
            ),
            t.up(AGENT, Up.REQUEST),
            a,
            AGENT_KEY,
        ),
        "chunk-request-update": (
            agent_signed(ChunkRequest(agent_id=AGENT, digest=update.blob.digest, missing=[0])),
            t.down(AGENT, Down.REQUEST),
            c,
            AGENT_KEY,
        ),
        "global-agent": (
            agent_signed(ann.model_copy(update={"agent_id": AGENT})),
            t.down(AGENT, Down.GLOBAL),
            c,
            AGENT_KEY,
        ),
        "global-broadcast": (ann, t.global_model(PROTOTYPE), c, UNSIGNED),
    }
    base: dict[str, Entry] = {
        "registration": (registration, t.up(AGENT, Up.REGISTER), a, AGENT_KEY),
        "task": (task, t.down(AGENT, Down.TASK), c, AGENT_KEY),
        "update-fp16": (update, t.up(AGENT, Up.UPDATE), a, AGENT_KEY),
    }
    entries: dict[str, Any] = {}
    for name, (message, topic, sender, key) in (base | messages).items():
        signed = key != UNSIGNED
        entries[name] = {
            "kind": message_kind(type(message)),
            "file": f"{name}.json",
            "topic": topic,
            "sender": sender,
            "key": key,
            "signed_bytes": f"{name}.signed-bytes.bin" if signed else None,
            "signature": getattr(message, "signature", ""),
        }
    return messages, entries


def write(out: Path) -> list[Path]:
    """Write schemas and vectors under ``out``; returns the paths written."""
    written = []
    for sub, entries in (("schemas", schemas()), ("vectors", vectors()[0])):
        folder = out / sub
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            if stale.is_file() and stale.name not in entries:
                stale.unlink()
        for name, data in entries.items():
            (folder / name).write_bytes(data)
            written.append(folder / name)
    manifest = out / "vectors" / "manifest.json"
    manifest.write_bytes(_json(vectors()[1]))
    written.append(manifest)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description="Write the wire protocol's schemas and vectors.")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    paths = write(args.out)
    print(f"wrote {len(paths)} files under {args.out}")


if __name__ == "__main__":
    main()
