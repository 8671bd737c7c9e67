"""Shared pieces of the deploy tests: a fleet's release key, synthetic releases in a
release store, and a simulated device written with the library pieces (it verifies
offers and metadata, pulls the artifacts by chunk request, reassembles and checks them,
and reports, signed with its secret).

The real agent (``edge_agent``) is tested on its own side; these devices only follow
the protocol closely enough to drive the coordinator's release service.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tuf.api.metadata import Root

from coordinator.deploy.publish import Published, Signing, load_signing, publish
from coordinator.deploy.store import ReleaseStore
from takfl.mqtt.blobs import REQUEST_BATCH, BlobReceiver
from takfl.mqtt.client import MqttClient, MqttSettings
from takfl.release.keys import generate_release_key
from takfl.release.metadata import Release, ReleaseRefused, ReleaseSpec, check_artifact
from takfl.release.metadata import verify_release as verify_metadata
from takfl.release.reference import encode_reference
from takfl.wire.errors import WireError
from takfl.wire.messages import (
    BlobRef,
    ChunkRequest,
    chunk_count,
    decode_chunk,
    decode_message,
    encode_message,
)
from takfl.wire.release import ReleaseOffer, ReleaseReport
from takfl.wire.signing import sign, verify
from takfl.wire.topics import Down, Topics, Up

FLEET = "lab"
COORDINATOR = "coordinator"


def signing_for(folder: Path, fleet: str = FLEET) -> Signing:
    """A fresh release key and root in ``folder``, loaded as the coordinator loads them."""
    generate_release_key(folder)
    return load_signing(folder, fleet)


def spec(prototype: str, fleet: str = FLEET, **change: object) -> ReleaseSpec:
    fields: dict[str, object] = {
        "fleet": fleet,
        "prototype": prototype,
        "round": 1,
        "runtime": "onnxruntime",
        "format": "onnx",
        "quantization": "none",
        "builder": "cnn_digits_small",
        "num_classes": 10,
        "input_shape": (1, 8, 8),
        "tolerance": 1e-3,
        "min_top1": 1.0,
    }
    fields.update(change)
    return ReleaseSpec.model_validate(fields)


def synthetic_release(
    store: ReleaseStore,
    signing: Signing,
    prototype: str,
    *,
    size: int = 3000,
    chunk_size: int = 1024,
    seed: int = 0,
) -> Published:
    """A signed, stored release whose 'model' is ``size`` random bytes."""
    rng = np.random.default_rng(seed)
    model = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    reference = encode_reference(
        rng.normal(size=(2, 1, 8, 8)).astype(np.float32),
        rng.normal(size=(2, 10)).astype(np.float32),
    )
    return publish(
        store,
        signing,
        spec=spec(prototype, fleet=signing.fleet, round=seed),
        model=model,
        model_name=f"{prototype}-round-{seed}-fp32.onnx",
        reference=reference,
        chunk_size=chunk_size,
    )


@dataclass
class Trusted:
    version: int = 0
    digest: str | None = None


@dataclass
class SimDevice:
    """A device of ``prototype`` that installs what it is offered.

    ``behaviour``: ``healthy``; ``fails`` (fails the health check of installs, accepts
    rollbacks); ``silent`` (receives offers, never answers).
    """

    settings: MqttSettings
    fleet: str
    agent_id: str
    prototype: str
    secret: bytes
    root: Root
    behaviour: str = "healthy"
    trusted: Trusted = field(default_factory=Trusted)
    offers: list[ReleaseOffer] = field(default_factory=list)
    forged: int = 0
    refused: list[str] = field(default_factory=list)
    held: dict[str, bytes] = field(default_factory=dict)  # sha256 -> artifact bytes
    active: int | None = None  # the release whose model it serves
    chunk_requests: int = 0
    chunks_received: int = 0

    def __post_init__(self) -> None:
        self.topics = Topics(self.fleet)
        self.receiver = BlobReceiver(quiet_s=1.0)
        self.client = MqttClient(self.settings, self.agent_id, persistent=False)
        self.client.route(self.topics.down(self.agent_id, Down.RELEASE), self._on_offer)
        self.client.route(self.topics.down(self.agent_id, Down.CHUNK), self._on_chunk)
        self._current: tuple[ReleaseOffer, Release] | None = None
        self._lock = threading.Lock()
        self._run = ""

    def start(self) -> SimDevice:
        self.client.start(timeout=10)
        return self

    def stop(self) -> None:
        self.client.stop()

    # -- protocol ----------------------------------------------------------------------
    def report(self, offer: ReleaseOffer, state: str, **kw: object) -> None:
        msg = ReleaseReport.model_validate(
            {
                "agent_id": self.agent_id,
                "prototype": self.prototype,
                "rollout": offer.rollout,
                "version": offer.version,
                "state": state,
                "active_version": self.active,
                "sent_at": time.time(),
                "run": offer.run,
                **kw,
            }
        )
        self.client.publish(
            self.topics.up(self.agent_id, Up.RELEASE), encode_message(sign(msg, self.secret))
        )

    def _on_offer(self, _topic: str, payload: bytes) -> None:
        offer = decode_message(ReleaseOffer, payload)
        if not verify(offer, self.secret):
            self.forged += 1
            return
        self.offers.append(offer)
        self._run = offer.run  # reports and chunk requests echo the release command's run
        if self.behaviour == "silent":
            return
        try:
            release = verify_metadata(
                offer.metadata.encode(),
                self.root,
                fleet=self.fleet,
                prototype=self.prototype,
                trusted_version=self.trusted.version,
                trusted_digest=self.trusted.digest,
            )
        except ReleaseRefused as e:
            self.refused.append(e.reason.value)
            self.report(offer, "failed", reason=e.reason.value, detail=e.detail[:500])
            return
        self.trusted = Trusted(release.version, release.digest)
        self.report(offer, "downloading")
        self._current = (offer, release)
        for artifact in (release.model, release.reference):
            if artifact.sha256 not in self.held:
                self._fetch(artifact.sha256, artifact.length, offer.chunk_size)
        self._maybe_install()

    def _fetch(self, digest: str, size: int, chunk_size: int) -> None:
        ref = BlobRef(
            digest=digest, size=size, chunk_size=chunk_size, count=chunk_count(size, chunk_size)
        )
        if not self.receiver.expect(COORDINATOR, ref):
            return
        missing = self.receiver.missing(COORDINATOR, digest)[:REQUEST_BATCH]
        request = ChunkRequest(
            run=self._run, agent_id=self.agent_id, digest=digest, missing=missing
        )
        self.chunk_requests += 1
        self.client.publish(
            self.topics.up(self.agent_id, Up.REQUEST),
            encode_message(sign(request, self.secret)),
        )

    def _on_chunk(self, _topic: str, payload: bytes) -> None:
        self.chunks_received += 1
        try:
            chunk = decode_chunk(payload)
            if not self.receiver.is_pending(COORDINATOR, chunk.hex_digest):
                return
            blob = self.receiver.add(COORDINATOR, chunk)
        except WireError:
            return
        if blob is None or self._current is None:
            return
        _, release = self._current
        for artifact in (release.model, release.reference):
            if artifact.sha256 == chunk.hex_digest:
                check_artifact(artifact, blob)
                self.held[artifact.sha256] = blob
        self._maybe_install()

    def _maybe_install(self) -> None:
        if self._current is None:
            return
        offer, release = self._current
        if not all(a.sha256 in self.held for a in (release.model, release.reference)):
            return
        self._current = None
        self.report(offer, "verifying")
        if self.behaviour == "fails" and offer.action == "install":
            self.report(offer, "failed", reason="parity", detail="max |diff| 3.2 > 0.001")
            return
        self.active = release.reinstates
        self.report(
            offer,
            "installed",
            runtime=release.spec.runtime,
            install_s=0.5,
            latency_p50_ms=1.25,
            latency_p99_ms=2.5,
            peak_rss_mb=120.0,
        )
