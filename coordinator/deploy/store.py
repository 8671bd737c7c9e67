"""The release store in the run directory: signed metadata, artifacts, rollout records.

    RUN/releases/<prototype>/<version>.json   the signed release metadata, as devices get it
    RUN/releases/blobs/<sha256>                artifacts and reference files, content-addressed
    RUN/releases/rollouts.json                 every rollout record (coordinator.deploy.rollout)
    RUN/releases/.lock                         held by the one release command at work

Every write is atomic (temporary file + rename). Stored metadata is never replaced
by different bytes: a version, once published, means one release for good. Blobs are
checked against their name when read.

The names are the run layout's (:mod:`takfl.run_layout`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from tuf.api.metadata import Root

from coordinator.deploy.rollout import Rollout
from takfl.files import atomic_write_bytes
from takfl.release.metadata import Release, ReleaseRefused, verify_release
from takfl.run_layout import RELEASE_BLOBS_DIR, RELEASE_LOCK, ROLLOUTS_FILE, releases_dir

_VERSION_FILE = re.compile(r"^([1-9][0-9]*)\.json$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Stored releases are re-read to reuse their artifacts (rollbacks), also after they
# expired: expiry protects devices, not the coordinator's own records. Verifying "as
# of" this instant checks signature and structure and skips both expiry checks.
ANY_TIME = datetime(1970, 1, 2, tzinfo=timezone.utc)


class ReleaseStoreError(ValueError):
    """The release store is missing something, is damaged, or is in use."""


class ReleaseStore:
    """``RUN/releases`` of one run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.root = releases_dir(self.run_dir)

    # -- metadata ------------------------------------------------------------------------
    def metadata_path(self, prototype: str, version: int) -> Path:
        return self.root / prototype / f"{version}.json"

    def versions(self, prototype: str) -> list[int]:
        """Stored release versions of ``prototype``, ascending."""
        folder = self.root / prototype
        if not folder.is_dir():
            return []
        found = (_VERSION_FILE.match(p.name) for p in folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest_version(self, prototype: str) -> int:
        """The newest stored version of ``prototype`` (0: none yet)."""
        versions = self.versions(prototype)
        return versions[-1] if versions else 0

    def save_metadata(self, prototype: str, version: int, data: bytes) -> Path:
        """Store signed metadata; the same bytes again are fine, others are refused."""
        path = self.metadata_path(prototype, version)
        if path.is_file():
            if path.read_bytes() == data:
                return path
            raise ReleaseStoreError(
                f"{path} already holds a different release {version} of {prototype}; "
                "release versions are never reused"
            )
        atomic_write_bytes(path, data)
        return path

    def metadata(self, prototype: str, version: int) -> bytes:
        path = self.metadata_path(prototype, version)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            known = ", ".join(map(str, self.versions(prototype))) or "none"
            raise ReleaseStoreError(
                f"no release {version} of {prototype} in {self.root} (stored: {known})"
            ) from None

    def release(self, prototype: str, version: int, root: Root, fleet: str) -> Release:
        """A stored release, its signature checked against ``root`` (not its expiry)."""
        data = self.metadata(prototype, version)
        try:
            release = verify_release(data, root, fleet=fleet, prototype=prototype, now=ANY_TIME)
        except ReleaseRefused as e:
            raise ReleaseStoreError(
                f"stored release {version} of {prototype} does not verify: {e}"
            ) from e
        if release.version != version:
            raise ReleaseStoreError(
                f"{self.metadata_path(prototype, version)} holds version {release.version}"
            )
        return release

    # -- blobs ---------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ReleaseStoreError(f"{sha256!r} is not a SHA-256 digest")
        return self.root / RELEASE_BLOBS_DIR / sha256

    def put_blob(self, data: bytes) -> str:
        """Store ``data`` under its SHA-256 (hex), which is returned."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if not path.is_file():
            atomic_write_bytes(path, data)
        return digest

    def blob(self, sha256: str) -> bytes:
        """A stored blob, checked against its digest."""
        path = self.blob_path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ReleaseStoreError(f"no blob {sha256} in {path.parent}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ReleaseStoreError(f"{path} is damaged: its SHA-256 differs from its name")
        return data

    # -- rollouts --------------------------------------------------------------------------
    @property
    def rollouts_path(self) -> Path:
        return self.root / ROLLOUTS_FILE

    def load_rollouts(self) -> list[Rollout]:
        """Every rollout recorded so far, oldest first ([] when none)."""
        try:
            raw = json.loads(self.rollouts_path.read_text())
            return [Rollout.from_dict(r) for r in raw["rollouts"]]
        except FileNotFoundError:
            return []
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ReleaseStoreError(f"{self.rollouts_path} is not a rollout record ({e})") from e

    def save_rollouts(self, rollouts: list[Rollout]) -> None:
        body = json.dumps({"rollouts": [r.to_dict() for r in rollouts]}, indent=1)
        atomic_write_bytes(self.rollouts_path, body.encode())

    # -- one command at a time ---------------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store for one release command; :class:`ReleaseStoreError` if another
        holds it (two would overwrite each other's rollout records)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / RELEASE_LOCK, "a+b") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ReleaseStoreError(
                    f"another release or rollback command is at work on {self.run_dir}; "
                    "wait for it (or release several prototypes in one command with --all)"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
