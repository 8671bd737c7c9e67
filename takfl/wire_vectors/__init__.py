"""JSON Schemas of every wire message and golden test vectors, for native agents.

    python -m takfl.wire_vectors [--out docs/protocol]

writes ``schemas/<kind>.schema.json`` (one per message, generated from the pydantic
models) and ``vectors/``: a task, a global-model blob and its chunks, an update in each
codec, every control message an agent sends or receives, the edge cases of canonical
JSON, versions and native senders (:mod:`takfl.wire_vectors.edges`), releases, and the
layout of every model architecture; each signed message with the exact bytes its
signature covers. ``vectors/manifest.json`` describes every file: for each message its
whole JSON object, topic, sender and key, so an implementation can rebuild every byte
from the manifest alone. Everything is deterministic (a fixed secret, run, times, nonces
and tensors), so the files are byte-for-byte reproducible and the tests regenerate and
compare them. The messages and their bytes come from the pure :mod:`takfl.wire`; this
package only builds the fixed examples and writes them to files.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

from takfl.mqtt.blobs import REQUEST_BATCH
from takfl.wire.chunking import split
from takfl.wire.envelope import MAX_MESSAGE_BYTES, WireMessage
from takfl.wire.messages import (
    COMPRESSIONS,
    MAX_CHUNK_BYTES,
    MAX_METRICS,
    MAX_MISSING,
    Ack,
    ChunkRequest,
    GlobalAnnouncement,
    Registration,
    Status,
    TaskMessage,
    UpdateHeader,
)
from takfl.wire.release import ReleaseOffer, ReleaseReport
from takfl.wire.secure import SECURE_MESSAGES
from takfl.wire.signing import DOMAIN
from takfl.wire.version import PROTOCOL
from takfl.wire_vectors import edges
from takfl.wire_vectors.architectures import architectures
from takfl.wire_vectors.fixed import (
    CHUNK_SIZE,
    FLEET,
    PROGRAM,
    PROTOTYPE,
    RUN,
    SECRET,
    Files,
    Vector,
    as_json,
    global_state,
    tensors,
    trained_state,
)
from takfl.wire_vectors.releases import release_files, release_vectors
from takfl.wire_vectors.round import (
    ack_vectors,
    chunk_files,
    downlink_vectors,
    global_blob,
    global_vectors,
    golden_registration,
    golden_task,
    message_ref_of,
    request_vectors,
    round_vectors,
    status_vectors,
    update_vectors,
)
from takfl.wire_vectors.secure import secure_vectors

__all__ = ["COMPRESSIONS", "FLEET", "MESSAGES", "PROTOTYPE", "message_kind", "vectors", "write"]

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
    *SECURE_MESSAGES,
)
DEFAULT_OUT = Path("docs/protocol")
DESCRIPTION = (
    f"Golden vectors of the takfl wire protocol {PROTOCOL}; see docs/protocol.md. "
    "Regenerate with: python -m takfl.wire_vectors --out docs/protocol"
)
ARCHITECTURES = "architectures.json"


def message_kind(cls: type[WireMessage]) -> str:
    """The ``kind`` a message class carries on the wire (e.g. ``"task"``)."""
    return str(cls.model_fields["kind"].default)


def schemas() -> Files:
    """``<kind>.schema.json`` -> JSON Schema bytes of each wire message."""
    out = {}
    for cls in MESSAGES:
        schema = cls.model_json_schema(by_alias=True, mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"takfl-wire-{PROTOCOL}/{message_kind(cls)}"
        out[f"{message_kind(cls)}.schema.json"] = as_json(schema)
    return out


def _blob_entry(name: str, blob: bytes) -> dict[str, Any]:
    """The manifest's description of a blob file: name, SHA-256 and chunk count."""
    return {
        "blob": name,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "chunks": len(split(blob, CHUNK_SIZE)),
    }


def message_vectors() -> tuple[
    dict[str, Vector], Files, dict[str, Any], dict[str, Any], dict[str, Any]
]:
    """Every message vector by name, the blob files, and the manifest's ``updates``,
    ``downlink`` and ``secagg``."""
    glob = global_blob()
    task, registration = golden_task(glob), golden_registration()
    base = round_vectors(task, registration)
    blobs, updates, update_entries = update_vectors(task)
    fp16 = updates["update-fp16"]
    out = base | updates | {"update-metrics": edges.metrics_update(fp16)}
    out |= ack_vectors(base["registration"], task, fp16)
    out |= status_vectors() | request_vectors(task, fp16) | global_vectors(task)
    out |= edges.registration_variants(base["registration"])
    out |= edges.version_vectors(base["registration"])
    out |= release_vectors()
    down_files, down_vectors, downlink = downlink_vectors(task)
    out |= down_vectors
    files: Files = {"global.safetensors": glob, **chunk_files("global", glob), **blobs}
    files |= {"program.pte": PROGRAM, **chunk_files("program", PROGRAM)} | down_files
    secure, secure_files, secagg = secure_vectors(task)
    out |= secure
    files |= secure_files
    return out, files, update_entries, downlink, secagg


def caps() -> dict[str, int]:
    """The protocol's fixed caps (docs/protocol.md, "Caps")."""
    return {
        "message_bytes": MAX_MESSAGE_BYTES,
        "chunk_payload_bytes": MAX_CHUNK_BYTES,
        "metrics_entries": MAX_METRICS,
        "missing_indices_accepted": MAX_MISSING,
        "missing_indices_sent": REQUEST_BATCH,
    }


def vectors() -> tuple[Files, dict[str, Any]]:
    """(file name -> bytes, manifest) of the golden vectors."""
    messages, files, updates, downlink, secagg = message_vectors()
    for name, vector in messages.items():
        files |= vector.files(name)
    release, release_entry = release_files()
    files |= release
    files[ARCHITECTURES] = as_json(architectures())
    glob = files["global.safetensors"]
    manifest = {
        "description": DESCRIPTION,
        "protocol": PROTOCOL,
        "secret_hex": SECRET.hex(),
        "signing_domain_hex": DOMAIN.hex(),
        "run": RUN,
        "chunk_size": CHUNK_SIZE,
        "caps": caps(),
        "global": _blob_entry("global.safetensors", glob) | {"tensors": tensors(global_state())},
        "trained": tensors(trained_state()),
        "updates": updates,
        "downlink": downlink,
        "secagg": secagg,
        "program": _blob_entry("program.pte", PROGRAM)
        | {"note": "stand-in bytes, not a real ExecuTorch program"},
        "registration_message_ref": message_ref_of(messages["registration"]),
        "canonical": edges.canonical_cases(),
        "broker_password": edges.broker_password(),
        "freshness": edges.freshness_cases(),
        "reasons": edges.reasons(),
        "architectures": ARCHITECTURES,
        "release": release_entry,
        "messages": {name: v.entry(name) for name, v in messages.items()},
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
    }
    return files, manifest


def write(out: Path) -> list[Path]:
    """Write schemas and vectors under ``out`` (files no longer generated are removed);
    returns the paths written."""
    files, manifest = vectors()
    written = []
    for sub, entries in (("schemas", schemas()), ("vectors", files)):
        folder = out / sub
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            if stale.is_file() and stale.name not in entries and stale.name != "manifest.json":
                stale.unlink()
        for name, data in entries.items():
            (folder / name).write_bytes(data)
            written.append(folder / name)
    path = out / "vectors" / "manifest.json"
    path.write_bytes(as_json(manifest))
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write the wire protocol's schemas and vectors.")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    paths = write(args.out)
    print(f"wrote {len(paths)} files under {args.out}")
