"""The protocol's JSON Schemas and golden vectors (docs/protocol/) stay in sync with the
code, and say what docs/protocol.md says: checked here with only the standard library,
numpy and safetensors, as a native implementation would check itself."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as st_load

from takfl import wire_vectors as gen

ROOT = Path(__file__).resolve().parent.parent / "docs" / "protocol"
VEC = ROOT / "vectors"
REGENERATE = "regenerate with: python -m takfl.wire_vectors --out docs/protocol"


def manifest() -> dict:
    return json.loads((VEC / "manifest.json").read_text())


def test_checked_in_files_equal_a_fresh_generation_byte_for_byte(tmp_path: Path) -> None:
    gen.write(tmp_path)
    for sub in ("schemas", "vectors"):
        fresh = {p.name: p.read_bytes() for p in (tmp_path / sub).iterdir()}
        kept = {p.name: p.read_bytes() for p in (ROOT / sub).iterdir()}
        assert sorted(fresh) == sorted(kept), REGENERATE
        for name, data in fresh.items():
            assert kept[name] == data, f"{sub}/{name} is stale; {REGENERATE}"


def test_every_message_has_a_schema_naming_its_fields() -> None:
    for cls in gen.MESSAGES:
        kind = gen.message_kind(cls)
        schema = json.loads((ROOT / "schemas" / f"{kind}.schema.json").read_text())
        assert schema["additionalProperties"] is False
        assert set(schema["properties"]) == {f.alias or n for n, f in cls.model_fields.items()}


SIGNED = [
    name
    for name, entry in json.loads((VEC / "manifest.json").read_text())["messages"].items()
    if entry["key"] == "agent secret"
]


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_signature_is_hmac_of_the_documented_bytes(name: str) -> None:
    # Prepare
    secret = bytes.fromhex(manifest()["secret_hex"])
    message = json.loads((VEC / f"{name}.json").read_bytes())
    signed = (VEC / f"{name}.signed-bytes.bin").read_bytes()
    # Execute: canonical JSON of every field but the signature, sorted keys, no spaces
    body = {k: v for k, v in message.items() if k != "signature"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    # Assert
    assert signed == b"takfl-wire-v1\x00" + canonical
    assert hmac.new(secret, signed, hashlib.sha256).hexdigest() == message["signature"]


def reassemble(prefix: str, digest_hex: str, count: int) -> bytes:
    parts = {}
    for path in sorted(VEC.glob(f"{prefix}.chunk-*.bin")):
        data = path.read_bytes()
        magic, version, digest, index, total = struct.unpack(">3sB32sII", data[:44])
        assert (magic, version, digest.hex(), total) == (b"TKC", 1, digest_hex, count)
        parts[index] = data[44:]
    assert sorted(parts) == list(range(count))
    return b"".join(parts[i] for i in range(count))


def test_global_chunks_reassemble_to_the_task_blob() -> None:
    task = json.loads((VEC / "task.json").read_bytes())
    ref = task["blob"]
    blob = reassemble("global", ref["digest"], ref["count"])
    assert blob == (VEC / "global.safetensors").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == ref["digest"] and len(blob) == ref["size"]
    tensors = st_load(blob)
    for name, spec in manifest()["global"]["tensors"].items():
        assert tensors[name].flatten().tolist() == pytest.approx(spec["values"])


@pytest.mark.parametrize("codec", gen.COMPRESSIONS)
def test_update_blob_decodes_by_the_documented_formula(codec: str) -> None:
    m = manifest()
    header = json.loads((VEC / f"update-{codec}.json").read_bytes())
    task = json.loads((VEC / "task.json").read_bytes())
    assert header["base_digest"] == task["blob"]["digest"] and header["compression"] == codec
    blob = reassemble(f"update-{codec}", header["blob"]["digest"], header["blob"]["count"])
    tensors = st_load(blob)
    for name, spec in m["global"]["tensors"].items():
        trained = np.array(m["trained"][name]["values"])
        base = np.array(spec["values"])
        if name.endswith("num_batches_tracked"):  # integers travel as the trained value
            assert tensors[name].flatten().tolist() == trained.tolist()
            continue
        delta = trained - base
        stored = tensors[name].astype(np.float64).flatten()
        if codec == "int8":
            scale = float(tensors[name + ".__scale__"])
            assert tensors[name].dtype == np.int8
            assert scale == pytest.approx(np.abs(delta).max() / 127, rel=1e-6)
            assert np.abs(stored * scale - delta).max() <= scale / 2 + 1e-7
        else:
            assert tensors[name].dtype == (np.float16 if codec == "fp16" else np.float32)
            assert np.abs(stored - delta).max() <= (1e-3 if codec == "fp16" else 1e-6)
        decoded = np.array(m["updates"][codec]["decoded_delta"][name]["values"])
        expected = stored * (scale if codec == "int8" else 1.0)
        assert decoded == pytest.approx(expected, abs=1e-7)


def test_manifest_lists_every_vector_with_its_digest() -> None:
    files = manifest()["files"]
    on_disk = {p.name for p in VEC.iterdir()} - {"manifest.json"}
    assert set(files) == on_disk
    for name, digest in files.items():
        assert hashlib.sha256((VEC / name).read_bytes()).hexdigest() == digest


def test_every_wire_message_has_a_vector_and_a_schema() -> None:
    # Every JSON message class of takfl.wire.messages, .release and .secure is listed, and
    # a native agent finds at least one vector of each kind, each on the topic the code uses.
    from takfl.wire import messages, release, secure
    from takfl.wire.canonical import canonical_bytes
    from takfl.wire.errors import UnsupportedVersion

    defined = {
        cls
        for module in (messages, release, secure)
        for cls in vars(module).values()
        if isinstance(cls, type)
        and issubclass(cls, messages.WireMessage)
        and "kind" in cls.model_fields
    }
    assert defined == set(gen.MESSAGES)
    entries = manifest()["messages"]
    assert {e["kind"] for e in entries.values()} == {gen.message_kind(c) for c in gen.MESSAGES}
    by_kind = {gen.message_kind(c): c for c in gen.MESSAGES}
    for name, entry in entries.items():
        data = (VEC / entry["file"]).read_bytes()
        assert entry["topic"].startswith("takfl/demo/")
        if entry["reads"] == "other_major":
            with pytest.raises(UnsupportedVersion):
                messages.decode_message(by_kind[entry["kind"]], data)
            continue
        decoded = messages.decode_message(by_kind[entry["kind"]], data)
        # re-encoded, a received message is the canonical form of what was received
        assert messages.encode_message(decoded) == canonical_bytes(entry["object"]), name
        assert (messages.encode_message(decoded) == data) == entry["canonical_wire"], name


def test_manifest_lists_every_message_vector_including_every_update_codec() -> None:
    entries = manifest()["messages"]
    message_files = {p.name.removesuffix(".json") for p in VEC.glob("*.json")} - {
        "manifest",
        "architectures",
        "release-root",
        "release-metadata",
    }
    assert set(entries) == message_files
    assert {f"update-{c}" for c in gen.COMPRESSIONS} <= set(entries)


def test_received_objects_verify_as_received() -> None:
    # A native sender's bytes, an omitted optional field, a higher minor with unknown
    # fields: each verifies over the object as received (never over a re-encoding).
    from takfl.wire.messages import Registration, decode_message
    from takfl.wire.signing import verify

    secret = bytes.fromhex(manifest()["secret_hex"])
    for name in ("registration-native", "registration-omitted", "registration-1.1"):
        reg = decode_message(Registration, (VEC / f"{name}.json").read_bytes())
        assert verify(reg, secret), name
        assert reg.telemetry is None or reg.telemetry.bytes_sent == 0
    minor = decode_message(Registration, (VEC / "registration-1.1.json").read_bytes())
    assert minor.protocol == "1.1" and "battery_pct" in minor.wire_object()


def test_the_version_refusal_is_read_across_majors() -> None:
    from takfl.wire.messages import decode_version_refusal
    from takfl.wire.signing import verify

    obj = json.loads((VEC / "ack-register-unsupported-version.json").read_bytes())
    as_two = {**obj, "protocol": "2.0"}  # as a 2.x agent receives a 2.x coordinator's
    for received in (obj, as_two):
        ack = decode_version_refusal(received)
        assert (ack.accepted, ack.reason) == (False, "unsupported_version")
    ack = decode_version_refusal(obj)
    assert verify(ack, bytes.fromhex(manifest()["secret_hex"]))


def test_canonical_cases_match_the_code() -> None:
    from takfl.wire.canonical import canonical_bytes, parse_json

    for case in manifest()["canonical"]:
        once = canonical_bytes(parse_json(case["input"]))
        assert once.decode() == case["canonical"]
        assert canonical_bytes(parse_json(once)) == once  # canonical is a fixed point


def test_reasons_are_one_enumerated_schema_type() -> None:
    from takfl.wire.reasons import REASONS, Refusal, ReleaseRefusal

    ack = json.loads((ROOT / "schemas" / "ack.schema.json").read_text())
    report = json.loads((ROOT / "schemas" / "release_report.schema.json").read_text())
    assert ack["properties"]["reason"]["enum"] == list(REASONS) == manifest()["reasons"]
    assert report["properties"]["reason"]["enum"] == list(REASONS)
    assert {r.value for r in Refusal} | {r.value for r in ReleaseRefusal} | {"ok"} == set(REASONS)


def test_envelope_keys_are_required_in_every_schema() -> None:
    for cls in gen.MESSAGES:
        schema = json.loads((ROOT / "schemas" / f"{gen.message_kind(cls)}.schema.json").read_text())
        assert {"protocol", "kind", "run", "sent_at", "nonce", "signature"} <= set(
            schema["required"]
        )


def test_unsigned_messages_are_only_the_coordinators_broadcasts() -> None:
    for name, entry in manifest()["messages"].items():
        message = json.loads((VEC / entry["file"]).read_bytes())
        if entry["key"] == "unsigned":
            assert message["signature"] == "" and entry["signed_bytes"] is None, name
            assert "/broadcast/" in entry["topic"] and entry["sender"] == "coordinator"
        else:
            assert entry["key"] == "agent secret" and len(message["signature"]) == 64, name


def test_control_messages_name_what_they_answer() -> None:
    # Prepare
    m = manifest()
    vec = {name: json.loads((VEC / e["file"]).read_bytes()) for name, e in m["messages"].items()}
    reg = vec["registration"]
    signed = (VEC / "registration.signed-bytes.bin").read_bytes()
    # Execute: a registration's reference is SHA-256 of its canonical bytes (without the
    # domain prefix) followed by its signature's hex digits
    ref = hashlib.sha256(signed[len(b"takfl-wire-v1\x00") :] + reg["signature"].encode())
    # Assert
    assert ref.hexdigest() == m["registration_message_ref"]
    for name in ("ack-register", "ack-register-refused"):
        assert vec[name]["digest"] == ref.hexdigest() and vec[name]["round_id"] is None
    task_digest = vec["task"]["blob"]["digest"]
    update_digest = vec["update-fp16"]["blob"]["digest"]
    assert vec["ack-task"]["digest"] == task_digest == vec["ack-task-refused"]["digest"]
    assert vec["ack-update"]["digest"] == update_digest == vec["ack-update-refused"]["digest"]
    assert [vec[n]["accepted"] for n in ("ack-task", "ack-task-refused")] == [True, False]
    assert vec["chunk-request-global"]["digest"] == task_digest
    assert vec["chunk-request-update"]["digest"] == update_digest
    assert vec["global-agent"]["digest"] == task_digest == vec["global-broadcast"]["digest"]
    assert vec["global-agent"]["size"] == len((VEC / "global.safetensors").read_bytes())
    assert (
        vec["global-agent"]["agent_id"] == "S-000" and vec["global-broadcast"]["agent_id"] is None
    )


def test_program_chunks_reassemble_to_the_task_program() -> None:
    task = json.loads((VEC / "task-program.json").read_bytes())
    ref = task["program"]
    program = reassemble("program", ref["digest"], ref["count"])
    assert program == (VEC / "program.pte").read_bytes() and len(program) == ref["size"]
    request = json.loads((VEC / "chunk-request-program.json").read_bytes())
    assert request["digest"] == ref["digest"] and request["missing"] == list(range(ref["count"]))


def test_release_metadata_is_ed25519_over_the_documented_canonical_bytes() -> None:
    # Prepare: only the vectors and a plain Ed25519 verifier, as a native agent has them
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    rel = manifest()["release"]
    doc = json.loads((VEC / rel["metadata"]).read_bytes())
    signed_bytes = (VEC / rel["signed_bytes"]).read_bytes()
    key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(rel["public_key_hex"]))

    # Execute: the canonical form (sorted keys, no spaces, no floats) of "signed"
    canonical = json.dumps(doc["signed"], sort_keys=True, separators=(",", ":")).encode()

    # Assert
    assert canonical == signed_bytes
    assert doc["signatures"] == [{"keyid": rel["keyid"], "sig": rel["signature"]}]
    key.verify(bytes.fromhex(rel["signature"]), signed_bytes)  # raises if it does not verify
    root = json.loads((VEC / rel["root"]).read_bytes())
    assert root["signed"]["roles"]["targets"]["keyids"] == [rel["keyid"]]
    targets = doc["signed"]["targets"]
    for part in ("model", "reference"):
        data = (VEC / rel[part]["file"]).read_bytes()
        target = targets[rel[part]["target"]]
        assert target["length"] == len(data)
        assert target["hashes"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_release_vectors_verify_as_a_device_verifies_them() -> None:
    from datetime import datetime

    from takfl.release.keys import parse_root
    from takfl.release.metadata import check_artifact, verify_release

    rel = manifest()["release"]
    root = parse_root((VEC / rel["root"]).read_bytes())
    offer = json.loads((VEC / "release-offer.json").read_bytes())

    release = verify_release(
        offer["metadata"].encode(),
        root,
        fleet=gen.FLEET,
        prototype=gen.PROTOTYPE,
        now=datetime.fromisoformat(rel["verify_at"]),
    )

    assert offer["metadata"].encode() == (VEC / rel["metadata"]).read_bytes()
    assert release.version == offer["version"] == 4
    check_artifact(release.model, (VEC / rel["model"]["file"]).read_bytes())
    check_artifact(release.reference, (VEC / rel["reference"]["file"]).read_bytes())


def test_missing_indices_caps_as_the_document_states() -> None:
    # a receiver accepts up to 4,096 indices in one chunk_request; a sender asks for at
    # most 1,024 at a time (what the manifest's caps say)
    from pydantic import ValidationError

    from takfl.mqtt.blobs import REQUEST_BATCH, BlobReceiver
    from takfl.wire.chunking import ReassemblyLimits, blob_ref
    from takfl.wire.messages import MAX_MISSING, ChunkRequest

    caps = manifest()["caps"]
    assert (caps["missing_indices_accepted"], caps["missing_indices_sent"]) == (4096, 1024)
    assert (MAX_MISSING, REQUEST_BATCH) == (4096, 1024)
    digest = "ab" * 32
    ChunkRequest(agent_id="S-000", digest=digest, missing=list(range(4096)))
    with pytest.raises(ValidationError):
        ChunkRequest(agent_id="S-000", digest=digest, missing=list(range(4097)))
    now = [0.0]
    receiver = BlobReceiver(
        ReassemblyLimits(max_pending=2, timeout_s=600.0), quiet_s=5.0, clock=lambda: now[0]
    )
    receiver.expect("S-000", blob_ref(bytes(3000), 1))  # 3,000 one-byte chunks, none arrived
    now[0] = 6.0
    asked = receiver.due_requests()
    assert [len(m.indices) for m in asked] == [1024]
