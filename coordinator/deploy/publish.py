"""Signing and storing releases: a new release from an artifact, a rollback release
from a stored one, and a stored release ready to offer.

Every release this module makes is verified as a device would verify it (signature
against the fleet's root, structure, spec) before it is stored; the metadata is
written after its blobs, so a stored version always has its artifacts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from securesystemslib.signer import Signer
from tuf.api.metadata import Root

from coordinator.deploy.store import ReleaseStore
from takfl.release.keys import KEY_FILE, ROOT_FILE, key_matches_root, load_root, load_signer
from takfl.release.metadata import Release, ReleaseSpec, build_release, sign_release, verify_release


class ReleaseBuildError(ValueError):
    """A release cannot be made as asked; the message says what to change."""


@dataclass(frozen=True, kw_only=True)
class Signing:
    """What signs releases and what devices trust, for one fleet."""

    signer: Signer
    root: Root
    fleet: str


def load_signing(folder: str | Path, fleet: str, *, key: Path | None = None) -> Signing:
    """The release key (``release-key.pem``) and ``root.json`` that ``provision`` wrote
    into ``folder``; ``key`` overrides the key's path. Raises :class:`ReleaseBuildError`
    (and ``ReleaseKeyError``) when they are missing or do not belong together."""
    key_path = key or Path(folder) / KEY_FILE
    root_path = key_path.with_name(ROOT_FILE)
    if not key_path.is_file():
        raise ReleaseBuildError(
            f"no release key at {key_path}; takfl-coordinator provision makes one (with "
            "root.json beside it, for the devices), or pass --release-key"
        )
    signer, root = load_signer(key_path), load_root(root_path)
    if not key_matches_root(signer, root):
        raise ReleaseBuildError(
            f"{key_path} is not the key {root_path} trusts: devices would refuse its releases"
        )
    return Signing(signer=signer, root=root, fleet=fleet)


@dataclass(frozen=True, kw_only=True)
class Published:
    """A stored, signed release and the bytes a device fetches for it."""

    release: Release
    blobs: Mapping[str, bytes]  # sha256 (hex) -> the model artifact and the reference file
    chunk_size: int  # bytes per chunk when the blobs travel

    @property
    def prototype(self) -> str:
        return self.release.spec.prototype

    @property
    def version(self) -> int:
        return self.release.version

    @property
    def size(self) -> int:
        """Bytes a device downloads (model + reference)."""
        return sum(len(b) for b in self.blobs.values())


def publish(
    store: ReleaseStore,
    signing: Signing,
    *,
    spec: ReleaseSpec,
    model: bytes,
    model_name: str,
    reference: bytes,
    chunk_size: int,
    expires: datetime | None = None,
) -> Published:
    """Sign ``spec`` with its artifacts as the prototype's next version and store it."""
    if spec.fleet != signing.fleet:
        raise ReleaseBuildError(f"a release of fleet {spec.fleet!r} signed for {signing.fleet!r}")
    version = store.latest_version(spec.prototype) + 1
    metadata = build_release(
        spec=spec,
        version=version,
        model=model,
        model_name=model_name,
        reference=reference,
        expires=expires,
    )
    raw = sign_release(metadata, signing.signer)
    release = verify_release(  # as a device that holds the previous version would
        raw,
        signing.root,
        fleet=signing.fleet,
        prototype=spec.prototype,
        trusted_version=version - 1,
    )
    blobs = {store.put_blob(model): model, store.put_blob(reference): reference}
    store.save_metadata(spec.prototype, version, raw)
    return Published(release=release, blobs=blobs, chunk_size=chunk_size)


def stored(
    store: ReleaseStore, signing: Signing, prototype: str, version: int, chunk_size: int
) -> Published:
    """A stored release with its blobs, ready to offer again."""
    release = store.release(prototype, version, signing.root, signing.fleet)
    blobs = {a.sha256: store.blob(a.sha256) for a in (release.model, release.reference)}
    return Published(release=release, blobs=blobs, chunk_size=chunk_size)


def rollback_release(
    store: ReleaseStore, signing: Signing, prototype: str, to_version: int, chunk_size: int
) -> Published:
    """A new version of ``prototype`` that reinstates stored release ``to_version``: the
    same spec and artifacts, ``rollback_to`` naming the release whose model it is (a
    rollback to a rollback names the original)."""
    old = stored(store, signing, prototype, to_version, chunk_size)
    spec = old.release.spec.model_copy(update={"rollback_to": old.release.reinstates})
    _, _, model_name = old.release.model.path.rpartition("/")
    return publish(
        store,
        signing,
        spec=spec,
        model=old.blobs[old.release.model.sha256],
        model_name=model_name,
        reference=old.blobs[old.release.reference.sha256],
        chunk_size=chunk_size,
    )


class StoredReleases:
    """The releases one release command offers: those it published, stored ones
    (read once), and rollback releases made on demand (see ``ReleaseSource`` in
    :mod:`coordinator.deploy.control`)."""

    def __init__(
        self,
        store: ReleaseStore,
        signing: Signing,
        chunk_sizes: Mapping[str, int],
        published: Iterable[Published] = (),
    ) -> None:
        self.store = store
        self.signing = signing
        self.chunk_sizes = chunk_sizes
        self._cache = {(p.prototype, p.version): p for p in published}

    def published(self, prototype: str, version: int) -> Published:
        key = (prototype, version)
        if key not in self._cache:
            self._cache[key] = stored(
                self.store, self.signing, prototype, version, self.chunk_sizes[prototype]
            )
        return self._cache[key]

    def make_rollback(self, prototype: str, to_version: int) -> Published:
        made = rollback_release(
            self.store, self.signing, prototype, to_version, self.chunk_sizes[prototype]
        )
        self._cache[(prototype, made.version)] = made
        return made
