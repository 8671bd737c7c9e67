"""Wire messages of model releases: the offer to one device and its reports.

An offer travels on the device's ``down/release`` topic, signed with the device's
secret (HMAC, as every message the device acts on) and stamped afresh at every send; it
carries the release metadata itself, which is independently signed with the fleet's
release key (TUF, see :mod:`takfl.release.metadata`), and the chunk size of the
artifacts. The device then
asks for the artifacts' chunks (``ChunkRequest`` on ``up/request``, the digests being
the SHA-256 the metadata signs) and reports each step of the install on
``up/release``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from takfl.wire.messages import MAX_CHUNK_BYTES, Ident, SignedMessage
from takfl.wire.reasons import OK, ReasonCode

MAX_RELEASE_METADATA_CHARS = 48 * 1024  # the signed metadata inside an offer

ReleaseAction = Literal["install", "rollback"]
# offered -> downloading -> verifying -> installed | failed; a device rolled back by a
# rollback release reports ``installed`` of that release.
ReleaseState = Literal["downloading", "verifying", "installed", "failed"]
OptFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)] | None


class ReleaseOffer(SignedMessage):
    """Install (or roll back to) the release in ``metadata``."""

    kind: Literal["release"] = "release"
    agent_id: Ident
    prototype: Ident
    rollout: Ident  # the rollout this offer belongs to (reports name it)
    action: ReleaseAction
    version: Annotated[int, Field(ge=1)]  # the metadata's version, for routing and logs
    metadata: Annotated[str, StringConstraints(max_length=MAX_RELEASE_METADATA_CHARS)]
    chunk_size: Annotated[int, Field(gt=0, le=MAX_CHUNK_BYTES)]  # of the artifact blobs


class ReleaseReport(SignedMessage):
    """A device's step in installing a release, and what it serves afterwards."""

    kind: Literal["release_report"] = "release_report"
    agent_id: Ident
    prototype: Ident
    rollout: Ident
    version: Annotated[int, Field(ge=1)]  # the offered release's version
    state: ReleaseState
    reason: ReasonCode = OK  # "ok" or a ReleaseRefusal value
    detail: Annotated[str, StringConstraints(max_length=512)] = ""
    active_version: Annotated[int, Field(ge=1)] | None = None  # serving now (None: nothing)
    runtime: Annotated[str, StringConstraints(max_length=64)] = ""
    install_s: OptFloat = None  # offer received -> switched (installed only)
    latency_p50_ms: OptFloat = None  # batch-1 latency measured by the health check
    latency_p99_ms: OptFloat = None
    peak_rss_mb: OptFloat = None  # the device process's peak RSS after loading the model
