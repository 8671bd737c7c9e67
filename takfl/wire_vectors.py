"""JSON Schemas of every wire message and golden test vectors, for native agents.

    python -m takfl.wire_vectors [--out docs/protocol]

writes ``schemas/<kind>.schema.json`` (one per message, generated from the pydantic
models) and ``vectors/`` (a task, a global-model blob and its chunks, an update in
each codec, and every control message an agent sends or receives: registrations,
acks, statuses, chunk requests, global announcements; each signed one with the exact
bytes its signature covers), plus ``vectors/manifest.json`` describing every file and
naming, for each message, its topic, its sender and the key that signs it.
Everything is deterministic: a fixed secret, fixed tensors and fixed times, so the
files are byte-for-byte reproducible and the tests regenerate and compare them.

The messages and their bytes come from the pure :mod:`takfl.wire`; this module only
builds the fixed examples and writes them to files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import CanonicalJSONSerializer

from takfl.release.keys import make_root
from takfl.release.metadata import ReleaseSpec, build_release, sign_release
from takfl.release.reference import encode_reference
from takfl.wire.chunking import blob_ref, split
from takfl.wire.codec import decode_state, encode_state
from takfl.wire.messages import (
    COMPRESSIONS,
    Ack,
    AckSubject,
    ChunkRequest,
    GlobalAnnouncement,
    InferenceStatus,
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
from takfl.wire.release import ReleaseOffer, ReleaseReport
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
    ReleaseOffer,
    ReleaseReport,
)
SECRET = bytes(range(32))  # the vectors' agent secret (never a real one)
AGENT, PROTOTYPE, ROUND = "S-000", "S", 3
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
# The release vectors' Ed25519 key, from a fixed seed (never a real one): Ed25519 signatures
# are deterministic, so the signed release metadata is byte-for-byte reproducible.
RELEASE_KEY_SEED = bytes(range(100, 132))
RELEASE_EXPIRES = datetime(2031, 1, 1, tzinfo=timezone.utc)
RELEASE_NOW = datetime.fromtimestamp(SENT_AT, tz=timezone.utc)
RELEASE_FLEET_KEY = "release key"  # Ed25519 under the fleet's release key (TUF metadata)
# A stand-in for an ONNX model: any bytes travel (and are checked) the same way.
RELEASE_MODEL = b"ONNX stand-in model, not a real graph: " + bytes(range(256))
DEFAULT_OUT = Path("docs/protocol")
DESCRIPTION = (
    "Golden vectors of the takfl wire protocol v1; see docs/protocol.md. "
    "Regenerate with: python -m takfl.wire_vectors --out docs/protocol"
)

Entry = tuple[SignedMessage, str, str, str]  # message, topic, sender, signing key
Files = dict[str, bytes]  # vector file name -> its bytes


def message_kind(cls: type[WireMessage]) -> str:
    """The ``kind`` a message class carries on the wire (e.g. ``"task"``)."""
    return str(cls.model_fields["kind"].default)


def schemas() -> Files:
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


# -- the fixed inputs ----------------------------------------------------------------------------
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


def _signed_parts(prefix: str, message: SignedMessage) -> Files:
    """``<prefix>.json`` (the message) and ``<prefix>.signed-bytes.bin`` (what it signs)."""
    payload = message.signing_payload()
    return {
        f"{prefix}.json": encode_message(message),
        f"{prefix}.signed-bytes.bin": DOMAIN + payload,
    }


def _signed_entry(prefix: str, message: SignedMessage) -> dict[str, str]:
    """The manifest's pointer to the files of :func:`_signed_parts`, with the signature."""
    return {
        "message": f"{prefix}.json",
        "signed_bytes": f"{prefix}.signed-bytes.bin",
        "signature": message.signature,
    }


def _chunks(prefix: str, blob: bytes) -> Files:
    return {f"{prefix}.chunk-{c.index:03d}.bin": encode_chunk(c) for c in split(blob, CHUNK_SIZE)}


def _blob_entry(name: str, blob: bytes) -> dict[str, Any]:
    """The manifest's description of a blob file: name, SHA-256 and chunk count."""
    return {
        "blob": name,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "chunks": len(split(blob, CHUNK_SIZE)),
    }


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {k: {"shape": list(v.shape), "values": v.flatten().tolist()} for k, v in state.items()}


# -- the messages of a round ---------------------------------------------------------------------
def golden_task(global_blob: bytes) -> TaskMessage:
    """The signed task of round ``ROUND`` offering ``global_blob`` to ``AGENT``."""
    return sign(
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
            blob=blob_ref(global_blob, CHUNK_SIZE),
            training=TrainingRef(epochs=1, batch_size=8, optimizer="sgd", learning_rate=0.01),
        ),
        SECRET,
    )


def golden_registration() -> Registration:
    """``AGENT``'s signed registration (no telemetry)."""
    return sign(
        Registration(
            agent_id=AGENT,
            prototype=PROTOTYPE,
            profile="android-phone",
            hardware_class="phone",
            num_samples=NUM_SAMPLES,
            sent_at=SENT_AT,
        ),
        SECRET,
    )


def update_vectors(task: TaskMessage) -> tuple[Files, dict[str, Any], dict[str, UpdateHeader]]:
    """The answer to ``task`` in every codec: (files, manifest ``updates``, header by codec)."""
    files: Files = {}
    entries: dict[str, Any] = {}
    headers: dict[str, UpdateHeader] = {}
    for codec in COMPRESSIONS:
        up = prepare_update(
            task,
            trained_state(),
            global_state(),
            secret=SECRET,
            num_samples=NUM_SAMPLES,
            metrics={"train_loss": 0.5},
            compression=codec,  # type: ignore[arg-type]
        )
        name = f"update-{codec}"
        files.update(_signed_parts(name, up.header))
        files[f"{name}.safetensors"] = up.blob
        files.update(_chunks(name, up.blob))
        headers[codec] = up.header
        entries[codec] = {
            "header": f"{name}.json",
            "signed_bytes": f"{name}.signed-bytes.bin",
            "signature": up.header.signature,
            "blob": f"{name}.safetensors",
            "chunks": len(split(up.blob, CHUNK_SIZE)),
            "decoded_delta": _tensors(decode_state(up.blob)),
        }
    return files, entries, headers


def vectors() -> tuple[Files, dict[str, Any]]:
    """(file name -> bytes, manifest) of the golden vectors."""
    glob = encode_state(global_state(), "fp32")
    task, registration = golden_task(glob), golden_registration()
    update_files, updates, headers = update_vectors(task)
    files: Files = {"global.safetensors": glob, **_chunks("global", glob)}
    files |= _signed_parts("task", task) | _signed_parts("registration", registration)
    files |= update_files | {"program.pte": PROGRAM} | _chunks("program", PROGRAM)
    control = control_messages(task, registration, headers["fp16"])
    for name, (message, _topic, _sender, key) in control.items():
        if key == UNSIGNED:
            files[f"{name}.json"] = encode_message(message)
        else:
            files.update(_signed_parts(name, message))
    messages = round_messages(task, registration, headers["fp16"]) | control
    release, release_entry = release_files()
    files |= release
    manifest = {
        "description": DESCRIPTION,
        "secret_hex": SECRET.hex(),
        "signing_domain_hex": DOMAIN.hex(),
        "chunk_size": CHUNK_SIZE,
        "global": _blob_entry("global.safetensors", glob) | {"tensors": _tensors(global_state())},
        "task": _signed_entry("task", task),
        "registration": _signed_entry("registration", registration),
        "trained": _tensors(trained_state()),
        "updates": updates,
        "program": _blob_entry("program.pte", PROGRAM)
        | {"note": "stand-in bytes, not a real ExecuTorch program"},
        "registration_message_ref": message_ref(registration),
        "release": release_entry,
        "messages": manifest_entries(messages),
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
    }
    return files, manifest


def round_messages(
    task: TaskMessage, registration: Registration, update: UpdateHeader
) -> dict[str, Entry]:
    """The registration, the task and the fp16 update (already signed) as manifest entries."""
    topics = Topics(FLEET)
    return {
        "registration": (registration, topics.up(AGENT, Up.REGISTER), AGENT_SIDE, AGENT_KEY),
        "task": (task, topics.down(AGENT, Down.TASK), COORDINATOR, AGENT_KEY),
        "update-fp16": (update, topics.up(AGENT, Up.UPDATE), AGENT_SIDE, AGENT_KEY),
    }


# -- control messages ----------------------------------------------------------------------------
# Every signed message, in either direction, is signed with the agent's own secret (``SECRET``
# here); the coordinator holds no key of its own, so its presence and the broadcast copy of a
# global announcement are unsigned.
def _signed(message: SignedMessage, topic: str, sender: str) -> Entry:
    """``message`` signed with the agent's secret, sent by ``sender`` on ``topic``."""
    return sign(message, SECRET), topic, sender, AGENT_KEY


def _unsigned(message: SignedMessage, topic: str) -> Entry:
    """``message`` as the coordinator sends it to monitors: no signature."""
    return message, topic, COORDINATOR, UNSIGNED


def control_messages(
    task: TaskMessage, registration: Registration, update: UpdateHeader
) -> dict[str, Entry]:
    """Every message an agent sends or receives beyond ``task``, ``registration`` and
    ``update`` (whose variants they are or which they answer), by vector name:
    (message, topic, sender, key)."""
    topics = Topics(FLEET)
    return (
        variant_messages(topics, task, registration)
        | ack_messages(topics, task, registration, update)
        | status_messages(topics)
        | chunk_request_messages(topics, task, update)
        | global_messages(topics, task)
        | release_messages(topics)
    )


def variant_messages(
    topics: Topics, task: TaskMessage, registration: Registration
) -> dict[str, Entry]:
    """The task offering a training program, and the registration carrying telemetry."""
    platform = PlatformInfo(
        machine="aarch64", system="Android", release="14", cpus=8, runtimes={"executorch": "1.5.1"}
    )
    telemetry = Telemetry(platform=platform, threads=2, rss_limit_mb=768.0)
    program_task = task.model_copy(
        update={"program": blob_ref(PROGRAM, CHUNK_SIZE), "signature": ""}
    )
    reg_telemetry = registration.model_copy(update={"telemetry": telemetry, "signature": ""})
    return {
        "task-program": _signed(program_task, topics.down(AGENT, Down.TASK), COORDINATOR),
        "registration-telemetry": _signed(reg_telemetry, topics.up(AGENT, Up.REGISTER), AGENT_SIDE),
    }


def _ack(
    topics: Topics, subject: AckSubject, digest: str, accepted: bool, sender: str, **more: Any
) -> Entry:
    """An ack of ``subject`` sent by ``sender``, on the receiving side's ack topic."""
    msg = Ack(subject=subject, agent_id=AGENT, digest=digest, accepted=accepted, **more)
    topic = topics.down(AGENT, Down.ACK) if sender == COORDINATOR else topics.up(AGENT, Up.ACK)
    return _signed(msg, topic, sender)


def ack_messages(
    topics: Topics, task: TaskMessage, registration: Registration, update: UpdateHeader
) -> dict[str, Entry]:
    """Each ack, accepting and refusing: of the registration, the task and the update."""
    registered, c, a = message_ref(registration), COORDINATOR, AGENT_SIDE
    return {
        "ack-register": _ack(topics, "register", registered, True, c),
        "ack-register-refused": _ack(
            topics,
            "register",
            registered,
            False,
            c,
            reason="wrong_prototype",
            detail="S-000 is registered for prototype S, not M",
        ),
        "ack-task": _ack(topics, "task", task.blob.digest, True, a, round_id=ROUND),
        "ack-task-refused": _ack(
            topics, "task", task.blob.digest, False, a, round_id=ROUND, reason="too_large"
        ),
        "ack-update": _ack(topics, "update", update.blob.digest, True, c, round_id=ROUND),
        "ack-update-refused": _ack(
            topics,
            "update",
            update.blob.digest,
            False,
            c,
            round_id=ROUND,
            reason="stale_round",
            detail="round 3 is closed; the current round is 4",
        ),
    }


def status_messages(topics: Topics) -> dict[str, Entry]:
    """The agent's presence (signed) and the coordinator's (unsigned), each with its last will."""
    agent, coordinator = topics.up(AGENT, Up.STATUS), topics.coordinator_status()
    return {
        "status-online": _signed(
            Status(agent_id=AGENT, state="online", time=SENT_AT), agent, AGENT_SIDE
        ),
        # the last will armed on the connection of status-online
        "status-offline": _signed(
            Status(agent_id=AGENT, state="offline", time=SENT_AT), agent, AGENT_SIDE
        ),
        "status-coordinator-online": _unsigned(
            Status(agent_id=COORDINATOR_ID, state="online", time=SENT_AT), coordinator
        ),
        # the coordinator's last will
        "status-coordinator-offline": _unsigned(
            Status(agent_id=COORDINATOR_ID, state="offline", time=0.0), coordinator
        ),
    }


def chunk_request_messages(
    topics: Topics, task: TaskMessage, update: UpdateHeader
) -> dict[str, Entry]:
    """Requests for missing chunks: of the global model and the program (by the agent) and
    of the update (by the coordinator)."""
    program = blob_ref(PROGRAM, CHUNK_SIZE)

    def request(digest: str, missing: list[int]) -> ChunkRequest:
        return ChunkRequest(agent_id=AGENT, digest=digest, missing=missing)

    up, down = topics.up(AGENT, Up.REQUEST), topics.down(AGENT, Down.REQUEST)
    return {
        "chunk-request-global": _signed(request(task.blob.digest, [1]), up, AGENT_SIDE),
        "chunk-request-program": _signed(
            request(program.digest, list(range(program.count))), up, AGENT_SIDE
        ),
        "chunk-request-update": _signed(request(update.blob.digest, [0]), down, COORDINATOR),
    }


def global_messages(topics: Topics, task: TaskMessage) -> dict[str, Entry]:
    """The new global model announced to one agent (signed) and broadcast (unsigned)."""
    ann = GlobalAnnouncement(
        round_id=ROUND, prototype=PROTOTYPE, digest=task.blob.digest, size=task.blob.size
    )
    return {
        "global-agent": _signed(
            ann.model_copy(update={"agent_id": AGENT}), topics.down(AGENT, Down.GLOBAL), COORDINATOR
        ),
        "global-broadcast": _unsigned(ann, topics.global_model(PROTOTYPE)),
    }


# -- releases ------------------------------------------------------------------------------------
def release_signer() -> CryptoSigner:
    """The vectors' release key (fixed seed)."""
    return CryptoSigner(Ed25519PrivateKey.from_private_bytes(RELEASE_KEY_SEED))


def release_reference() -> bytes:
    """Reference inputs (2, 1, 2, 2) and the outputs (2, 3) the release's model gives."""
    inputs = np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(2, 1, 2, 2)
    outputs = np.array([[2.0, -1.0, 0.5], [-0.25, 1.5, 0.0]], dtype=np.float32)
    return encode_reference(inputs, outputs)


def release_metadata() -> bytes:
    """Release 4 of prototype ``PROTOTYPE``: TUF targets metadata signed with the release key."""
    spec = ReleaseSpec(
        fleet=FLEET,
        prototype=PROTOTYPE,
        round=ROUND,
        runtime="onnxruntime",
        format="onnx",
        quantization="none",
        builder="mlp_digits",
        num_classes=3,
        input_shape=(1, 2, 2),
        mean=[0.5],
        std=[0.25],
        class_names=["zero", "one", "two"],
        tolerance=0.002,
        min_top1=1.0,
    )
    md = build_release(
        spec=spec,
        version=4,
        model=RELEASE_MODEL,
        model_name="S-round-3-fp32.onnx",
        reference=release_reference(),
        expires=RELEASE_EXPIRES,
        now=RELEASE_NOW,
    )
    return sign_release(md, release_signer())


def release_files() -> tuple[Files, dict[str, Any]]:
    """The fleet's root, a signed release and its two targets: (files, manifest ``release``)."""
    signer = release_signer()
    root = make_root(signer, expires=RELEASE_EXPIRES)
    metadata = release_metadata()
    doc = json.loads(metadata)
    signed_bytes = CanonicalJSONSerializer().serialize(Metadata.from_bytes(metadata).signed)
    files = {
        "release-root.json": root,
        "release-metadata.json": metadata,
        "release-metadata.signed-bytes.bin": signed_bytes,
        "release-model.onnx": RELEASE_MODEL,
        "release-reference.safetensors": release_reference(),
    }
    entry = {
        "root": "release-root.json",
        "public_key_hex": signer.public_key.keyval["public"],
        "keyid": signer.public_key.keyid,
        "metadata": "release-metadata.json",
        "signed_bytes": "release-metadata.signed-bytes.bin",
        "signature": doc["signatures"][0]["sig"],
        "model": {"file": "release-model.onnx", "target": "S/S-round-3-fp32.onnx"},
        "reference": {"file": "release-reference.safetensors", "target": "S/reference.safetensors"},
        "verify_at": RELEASE_NOW.isoformat(),
    }
    return files, entry


def release_messages(topics: Topics) -> dict[str, Entry]:
    """The offer of release 4 to the agent, its reports, and a status with inference telemetry."""
    metadata = release_metadata().decode()
    offer = ReleaseOffer(
        agent_id=AGENT,
        prototype=PROTOTYPE,
        rollout="S-v4",
        action="install",
        version=4,
        metadata=metadata,
        chunk_size=CHUNK_SIZE,
        sent_at=SENT_AT,
    )
    up = topics.up(AGENT, Up.RELEASE)

    def report(state: Any, **more: Any) -> ReleaseReport:
        return ReleaseReport(
            agent_id=AGENT,
            prototype=PROTOTYPE,
            rollout="S-v4",
            version=4,
            state=state,
            sent_at=SENT_AT + 30,
            **more,
        )

    installed = report(
        "installed",
        active_version=4,
        runtime="onnxruntime",
        install_s=2.5,
        latency_p50_ms=0.25,
        latency_p99_ms=0.75,
        peak_rss_mb=96.0,
    )
    failed = report(
        "failed",
        reason="parity",
        detail="max |diff| 0.5, top-1 agreement 50%",
        active_version=3,
        runtime="onnxruntime",
    )
    inference = Status(
        agent_id=AGENT,
        state="online",
        time=SENT_AT,
        inference=InferenceStatus(
            requests=120, errors=2, latency_p50_ms=0.5, latency_p99_ms=1.25, active_version=4
        ),
    )
    return {
        "release-offer": _signed(offer, topics.down(AGENT, Down.RELEASE), COORDINATOR),
        "release-report-downloading": _signed(report("downloading"), up, AGENT_SIDE),
        "release-report-installed": _signed(installed, up, AGENT_SIDE),
        "release-report-failed": _signed(failed, up, AGENT_SIDE),
        "status-online-inference": _signed(inference, topics.up(AGENT, Up.STATUS), AGENT_SIDE),
    }


def manifest_entries(messages: dict[str, Entry]) -> dict[str, Any]:
    """The manifest's ``messages``: per vector name its file, kind, topic, sender, key,
    signed bytes (None when unsigned) and signature."""
    entries: dict[str, Any] = {}
    for name, (message, topic, sender, key) in messages.items():
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
    return entries


# -- files ---------------------------------------------------------------------------------------
def write(out: Path) -> list[Path]:
    """Write schemas and vectors under ``out`` (files no longer generated are removed);
    returns the paths written."""
    files, manifest = vectors()
    written = []
    for sub, entries in (("schemas", schemas()), ("vectors", files)):
        folder = out / sub
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            if stale.is_file() and stale.name not in entries:
                stale.unlink()
        for name, data in entries.items():
            (folder / name).write_bytes(data)
            written.append(folder / name)
    path = out / "vectors" / "manifest.json"
    path.write_bytes(_json(manifest))
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write the wire protocol's schemas and vectors.")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    paths = write(args.out)
    print(f"wrote {len(paths)} files under {args.out}")


if __name__ == "__main__":
    main()
