"""JSON Schemas of every wire message and golden test vectors, for native agents.

    python -m takfl.wire.vectors [--out docs/protocol]

writes ``schemas/<kind>.schema.json`` (one per message, generated from the pydantic
models) and ``vectors/`` (a task, a global-model blob and its chunks, an update in
each codec with its signature, and the exact bytes each signature covers), plus
``vectors/manifest.json`` describing every file. Everything is deterministic: a fixed
secret, fixed tensors and fixed times, so the files are byte-for-byte reproducible
and the tests regenerate and compare them.
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
from takfl.wire.signing import DOMAIN, sign
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
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
    }
    return files, manifest


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
