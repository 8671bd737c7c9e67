"""Signed release metadata: what a device may install, checked before anything is used.

A release is TUF *targets* metadata (The Update Framework's format, canonical JSON and
Ed25519 signatures, through python-tuf's metadata API) signed with the fleet's release
key. Devices hold the fleet's TUF *root* metadata, which names that key (see
:mod:`takfl.release.keys`), so a release needs no per-device secret: it can be retained
and pass through site brokers as it is. Its two targets are the model artifact and a
small safetensors file of reference inputs and the outputs the artifact gives on them
(:mod:`takfl.release.reference`); the model target's ``custom`` block carries what the
device needs to run it (:class:`ReleaseSpec`).

Versions are per prototype and only go up: the metadata ``version`` is the release
number. A rollback is a new, higher version whose spec names the release it reinstates
(``rollback_to``) and lists that release's artifacts, so replaying old metadata is
always refused, as TUF refuses a rollback attack.

:func:`verify_release` checks, in this order, and raises :class:`ReleaseRefused` with
a named :class:`ReleaseRefusal` at the first failure: size, parse, signature (against
the root's ``targets`` role: an unknown key or tampered bytes fail here), expiry
(freeze attack), version against what the device already trusts (rollback attack),
then that the release is for this fleet and prototype and lists exactly the targets a
release has. :func:`check_artifact` checks a downloaded target's length and SHA-256
(arbitrary install, endless data) before it is written anywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    ValidationError,
)
from securesystemslib.signer import Signer
from tuf.api.exceptions import LengthOrHashMismatchError, UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import CanonicalJSONSerializer, JSONSerializer

from takfl.wire.reasons import ReleaseRefusal as ReleaseRefusal  # its home: the wire's reasons
from takfl.wire.topics import IDENT_RE

MAX_METADATA_BYTES = 64 * 1024  # signed release metadata larger than this is refused unread
RELEASE_ROLE = "targets"  # the TUF role that signs releases
MODEL = "model"  # ``custom.role`` of the model artifact
REFERENCE = "reference"  # ``custom.role`` of the reference inputs and outputs
SPEC_KEY = "takfl"  # key of the ReleaseSpec inside the model target's ``custom``
HASH = "sha256"
DEFAULT_LIFETIME = timedelta(days=30)  # expiry of a release unless told otherwise

Ident = Annotated[str, StringConstraints(pattern=f"^{IDENT_RE}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=64)]


def _float_from_text(value: object) -> object:
    """TUF's canonical JSON has no floats: the spec writes them as decimal strings."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # left for the float check to refuse with its message
    return value


# A finite float that travels as its shortest decimal string ("0.001").
TextFloat = Annotated[
    float,
    BeforeValidator(_float_from_text),
    Field(allow_inf_nan=False),
    PlainSerializer(repr, return_type=str),
]


class ReleaseRefused(ValueError):
    """A release (or one of its artifacts) cannot be installed; ``reason`` says why."""

    def __init__(self, reason: ReleaseRefusal, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ReleaseSpec(_Strict):
    """What a device needs to know to run a release's model (signed with it)."""

    fleet: Ident
    prototype: Ident
    round: Annotated[int, Field(ge=0)]  # the federation round the model comes from
    runtime: Name  # e.g. "onnxruntime", "ai-edge-litert"
    format: Name  # e.g. "onnx", "tflite"
    quantization: Name  # "none", "int8", "dynamic"
    builder: Name  # the model zoo builder it was exported from (informational)
    num_classes: Annotated[int, Field(ge=2, le=1_000_000)]
    input_shape: tuple[
        Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]
    ]
    mean: list[TextFloat] = []  # per channel: inputs are (x - mean) / std before the model
    std: list[TextFloat] = []
    class_names: list[Annotated[str, StringConstraints(max_length=128)]] = []
    # Health check: the device's outputs on the reference inputs may differ from the
    # reference outputs by at most ``tolerance`` (max abs, logits), and their top-1
    # classes must agree on at least ``min_top1`` of the inputs.
    tolerance: Annotated[TextFloat, Field(gt=0)]
    min_top1: Annotated[TextFloat, Field(ge=0, le=1)]
    rollback_to: Annotated[int, Field(ge=1)] | None = None  # the release this one reinstates


@dataclass(frozen=True, kw_only=True)
class Artifact:
    """One signed target: where it goes, how long it is and its SHA-256 (hex)."""

    path: str
    length: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class Release:
    """Verified release metadata of one prototype."""

    version: int
    expires: datetime
    spec: ReleaseSpec
    model: Artifact
    reference: Artifact
    raw: bytes  # the signed metadata exactly as received
    digest: str  # SHA-256 of ``raw`` (hex): names this exact metadata

    @property
    def reinstates(self) -> int:
        """The release whose model this one installs (itself unless a rollback)."""
        return self.spec.rollback_to or self.version


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _target(role: str, path: str, data: bytes, custom: dict[str, Any]) -> TargetFile:
    target = TargetFile.from_data(path, data, [HASH])
    target.unrecognized_fields["custom"] = {"role": role, **custom}
    return target


def build_release(
    *,
    spec: ReleaseSpec,
    version: int,
    model: bytes,
    model_name: str,
    reference: bytes,
    expires: datetime | None = None,
    now: datetime | None = None,
) -> Metadata[Targets]:
    """Unsigned release metadata for ``model`` (the artifact's bytes, published as
    ``<prototype>/<model_name>``) and ``reference`` (see :mod:`takfl.release.reference`).

    Raises:
        ValueError: ``version`` below 1 or an expiry before ``now`` (default: the clock).
    """
    if version < 1:
        raise ValueError(f"release versions start at 1, got {version}")
    now = now or _utc_now()
    expires = (expires or now + DEFAULT_LIFETIME).replace(microsecond=0)
    if expires <= now:
        raise ValueError(f"expiry {expires.isoformat()} is in the past")
    base = spec.prototype
    targets = {
        t.path: t
        for t in (
            _target(MODEL, f"{base}/{model_name}", model, {SPEC_KEY: spec.model_dump(mode="json")}),
            _target(REFERENCE, f"{base}/reference.safetensors", reference, {}),
        )
    }
    return Metadata(Targets(version=version, expires=expires, targets=targets))


def sign_release(metadata: Metadata[Targets], signer: Signer) -> bytes:
    """Sign with the release key; the compact JSON bytes that travel."""
    metadata.signatures.clear()
    metadata.sign(signer)
    return metadata.to_bytes(JSONSerializer(compact=True))


def _refuse(reason: ReleaseRefusal, detail: str) -> ReleaseRefused:
    return ReleaseRefused(reason, detail)


def _parse(data: bytes) -> Metadata[Targets]:
    if len(data) > MAX_METADATA_BYTES:
        raise _refuse(
            ReleaseRefusal.MALFORMED, f"{len(data)} bytes exceeds the {MAX_METADATA_BYTES} cap"
        )
    try:
        md = Metadata[Targets].from_bytes(data)
    except (DeserializationError, ValueError, TypeError, KeyError) as e:
        raise _refuse(ReleaseRefusal.MALFORMED, f"not release metadata ({e})") from e
    if not isinstance(md.signed, Targets):
        raise _refuse(ReleaseRefusal.MALFORMED, f"{md.signed.type} metadata, not targets")
    return md


def _check_signature(md: Metadata[Targets], root: Root) -> None:
    try:
        payload = CanonicalJSONSerializer().serialize(md.signed)
        root.verify_delegate(RELEASE_ROLE, payload, md.signatures)
    except UnsignedMetadataError as e:
        raise _refuse(ReleaseRefusal.BAD_SIGNATURE, str(e)) from e


def _artifacts(md: Metadata[Targets]) -> tuple[TargetFile, TargetFile]:
    by_role: dict[str, list[TargetFile]] = {}
    for target in md.signed.targets.values():
        role = target.custom.get("role") if isinstance(target.custom, dict) else None
        by_role.setdefault(str(role), []).append(target)
    model, reference = by_role.get(MODEL, []), by_role.get(REFERENCE, [])
    if len(model) != 1 or len(reference) != 1 or len(md.signed.targets) != 2:
        raise _refuse(
            ReleaseRefusal.WRONG_TARGET,
            "a release lists exactly one model and one reference target, got "
            f"{sorted(md.signed.targets)}",
        )
    for t in (model[0], reference[0]):
        if set(t.hashes) != {HASH} or len(t.hashes[HASH]) != 64:
            raise _refuse(ReleaseRefusal.MALFORMED, f"target {t.path} lacks a sha256 hash")
    return model[0], reference[0]


def _spec(model: TargetFile) -> ReleaseSpec:
    try:
        # validated as JSON (what it was): arrays are tuples there, even in strict mode
        return ReleaseSpec.model_validate_json(json.dumps(model.custom.get(SPEC_KEY)))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise _refuse(ReleaseRefusal.MALFORMED, f"release spec: {where}: {first['msg']}") from e


def _artifact(t: TargetFile) -> Artifact:
    return Artifact(path=t.path, length=t.length, sha256=t.hashes[HASH])


def verify_release(
    data: bytes,
    root: Root,
    *,
    fleet: str,
    prototype: str,
    trusted_version: int = 0,
    trusted_digest: str | None = None,
    now: datetime | None = None,
) -> Release:
    """Check received release metadata in TUF's order (see the module docstring).

    Args:
        root: the fleet's root metadata the device was provisioned with.
        trusted_version / trusted_digest: the newest release metadata this device has
            verified for its prototype (0/None: none yet). The same metadata again is
            accepted (an idempotent re-offer); anything else must be newer.
    Raises:
        ReleaseRefused: with the first check that failed.
    """
    md = _parse(data)
    _check_signature(md, root)
    now = now or _utc_now()
    if root.is_expired(now):
        raise _refuse(
            ReleaseRefusal.EXPIRED,
            f"the fleet's root metadata expired at {root.expires.isoformat()}; provision a "
            "new root.json on this device",
        )
    if md.signed.is_expired(now):
        raise _refuse(
            ReleaseRefusal.EXPIRED, f"expired at {md.signed.expires.isoformat()} (now {now})"
        )
    digest = hashlib.sha256(data).hexdigest()
    version = md.signed.version
    if version < trusted_version or (version == trusted_version and digest != trusted_digest):
        raise _refuse(
            ReleaseRefusal.OLD_VERSION,
            f"version {version} is not newer than the trusted version {trusted_version}",
        )
    model, reference = _artifacts(md)
    spec = _spec(model)
    if spec.fleet != fleet or spec.prototype != prototype:
        raise _refuse(
            ReleaseRefusal.WRONG_TARGET,
            f"release for {spec.fleet}/{spec.prototype}, this device is {fleet}/{prototype}",
        )
    if spec.rollback_to is not None and spec.rollback_to >= version:
        raise _refuse(
            ReleaseRefusal.MALFORMED,
            f"version {version} cannot roll back to a later release {spec.rollback_to}",
        )
    return Release(
        version=version,
        expires=md.signed.expires,
        spec=spec,
        model=_artifact(model),
        reference=_artifact(reference),
        raw=bytes(data),
        digest=digest,
    )


def check_artifact(artifact: Artifact, data: bytes) -> None:
    """Raise :class:`ReleaseRefused` (``bad_artifact``) unless ``data`` has the signed
    length and SHA-256 of ``artifact``."""
    target = TargetFile(artifact.length, {HASH: artifact.sha256}, artifact.path)
    try:
        target.verify_length_and_hashes(data)
    except LengthOrHashMismatchError as e:
        raise _refuse(ReleaseRefusal.BAD_ARTIFACT, f"{artifact.path}: {e}") from e


def read_installed(data: bytes, root: Root, *, fleet: str, prototype: str) -> Release:
    """Release metadata a device installed earlier, read back from its own disk.

    Checked as :func:`verify_release` checks an offer (parse, signature, targets, fleet
    and prototype) except for expiry and version: a model that passed its checks keeps
    serving after its metadata expires, and its version was judged when it arrived.

    Raises:
        ReleaseRefused: the stored metadata is damaged or not this device's.
    """
    md = _parse(data)
    _check_signature(md, root)
    model, reference = _artifacts(md)
    spec = _spec(model)
    if spec.fleet != fleet or spec.prototype != prototype:
        raise _refuse(
            ReleaseRefusal.WRONG_TARGET,
            f"release for {spec.fleet}/{spec.prototype}, this device is {fleet}/{prototype}",
        )
    return Release(
        version=md.signed.version,
        expires=md.signed.expires,
        spec=spec,
        model=_artifact(model),
        reference=_artifact(reference),
        raw=bytes(data),
        digest=hashlib.sha256(data).hexdigest(),
    )
