"""Release vectors: the fleet's root, a release signed with the fleet's release key
(Ed25519 over TUF's canonical JSON, deterministic from a fixed seed), its two targets, the
offer of it to the agent, the agent's reports and a status with the inference block. A
release command is a run of its own: the offer carries that run and the reports echo it."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import CanonicalJSONSerializer

from takfl.release.keys import make_root
from takfl.release.metadata import ReleaseRefusal, ReleaseSpec, build_release, sign_release
from takfl.release.reference import encode_reference
from takfl.wire.messages import InferenceStatus, Status
from takfl.wire.release import ReleaseOffer, ReleaseReport
from takfl.wire.topics import Down, Up
from takfl.wire_vectors.fixed import (
    AGENT,
    AGENT_SIDE,
    CHUNK_SIZE,
    COORDINATOR,
    FLEET,
    PROTOTYPE,
    ROUND,
    SENT_AT,
    Files,
    Vector,
    signed_vector,
    stamp,
)
from takfl.wire_vectors.round import TOPICS

RELEASE_KEY_SEED = bytes(range(100, 132))  # the vectors' Ed25519 key (never a real one)
RELEASE_EXPIRES = datetime(2031, 1, 1, tzinfo=timezone.utc)
RELEASE_NOW = datetime.fromtimestamp(SENT_AT, tz=timezone.utc)
RELEASE_RUN = "52656c656173652d636f6d6d616e6421"  # the release command's run
# A stand-in for an ONNX model: any bytes travel (and are checked) the same way.
RELEASE_MODEL = b"ONNX stand-in model, not a real graph: " + bytes(range(256))


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


def release_vectors() -> dict[str, Vector]:
    """The offer of release 4 to the agent, its reports, and a status with inference
    telemetry."""
    offer = ReleaseOffer(
        **stamp("release-offer", run=RELEASE_RUN),
        agent_id=AGENT,
        prototype=PROTOTYPE,
        rollout="S-v4",
        action="install",
        version=4,
        metadata=release_metadata().decode(),
        chunk_size=CHUNK_SIZE,
    )
    up = TOPICS.up(AGENT, Up.RELEASE)

    def report(name: str, state: Any, **more: Any) -> Vector:
        msg = ReleaseReport(
            **stamp(name, 30, run=RELEASE_RUN),
            agent_id=AGENT,
            prototype=PROTOTYPE,
            rollout="S-v4",
            version=4,
            state=state,
            **more,
        )
        return signed_vector(msg, up, AGENT_SIDE)

    inference = Status(
        **stamp("status-online-inference", 45),
        agent_id=AGENT,
        prototype=PROTOTYPE,
        state="online",
        time=SENT_AT,
        inference=InferenceStatus(
            requests=120, errors=2, latency_p50_ms=0.5, latency_p99_ms=1.25, active_version=4
        ),
    )
    return {
        "release-offer": signed_vector(offer, TOPICS.down(AGENT, Down.RELEASE), COORDINATOR),
        "release-report-downloading": report("release-report-downloading", "downloading"),
        "release-report-installed": report(
            "release-report-installed",
            "installed",
            active_version=4,
            runtime="onnxruntime",
            install_s=2.5,
            latency_p50_ms=0.25,
            latency_p99_ms=0.75,
            peak_rss_mb=96.0,
        ),
        "release-report-failed": report(
            "release-report-failed",
            "failed",
            reason=ReleaseRefusal.PARITY.value,
            detail="max |diff| 0.5, top-1 agreement 50%",
            active_version=3,
            runtime="onnxruntime",
        ),
        "status-online-inference": signed_vector(
            inference, TOPICS.up(AGENT, Up.STATUS), AGENT_SIDE
        ),
    }
