"""A/B model slots on the device: a release is installed into the slot not in use and
made active with one rename, so a device killed at any moment has a complete model.

Layout under ``<root>/<prototype>/``::

    slots/a/  slots/b/   metadata.json            the signed release metadata, as received
                         <model file>             the model under its target's file name
                         reference.safetensors    reference inputs and outputs
    active.json          which slot serves: {"slot", "version", "digest" (SHA-256 of the
                         slot's metadata.json), "model", "model_sha256", "reference_sha256",
                         "previous": the same for the slot served before, or null}
    trusted.json         {"version", "digest"}: the newest release metadata verified here
                         (moved forward only, so replayed older metadata stays refused)

Every write is atomic (temp file, fsync, rename: :mod:`takfl.files`); the switch is the
rename of ``active.json``. The active slot is never written: a new release goes into the
other one (the *staging* slot), emptied first of what the release does not need, and
artifacts already held in either slot with the right SHA-256 are copied, not fetched
again (a rollback to the previous release downloads nothing).

:meth:`SlotStore.open` re-checks the active slot (files present, SHA-256 of metadata,
model and reference as ``active.json`` records them); a damaged one falls back to the
previous slot if that one checks out, else the device has no model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from takfl.files import atomic_write_bytes
from takfl.wire.topics import check_ident

log = logging.getLogger(__name__)

SLOTS = ("a", "b")
SLOTS_DIR = "slots"
METADATA_FILE = "metadata.json"
REFERENCE_FILE = "reference.safetensors"
ACTIVE_FILE = "active.json"
TRUSTED_FILE = "trusted.json"
RESERVED = frozenset({METADATA_FILE, ACTIVE_FILE, TRUSTED_FILE})
FILE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"  # a file name inside a slot
_FILE_NAME = re.compile(FILE_NAME)
_Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class SlotError(ValueError):
    """A slot cannot be written or switched to as asked."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SlotRecord(_Strict):
    """What one slot holds, as ``active.json`` records it."""

    slot: Annotated[str, StringConstraints(pattern="^[ab]$")]
    version: Annotated[int, Field(ge=1)]
    digest: _Hex  # SHA-256 of the slot's metadata.json
    model: Annotated[str, StringConstraints(pattern=f"^{FILE_NAME}$")]
    model_sha256: _Hex
    reference_sha256: _Hex


class _ActiveFile(SlotRecord):
    previous: SlotRecord | None = None


class _TrustedFile(_Strict):
    version: Annotated[int, Field(ge=0)]
    digest: _Hex | None = None


@dataclass(frozen=True)
class ActiveSlot:
    """A slot whose files match its record: what the device serves."""

    record: SlotRecord
    folder: Path
    metadata: bytes  # the signed release metadata

    @property
    def model_path(self) -> Path:
        return self.folder / self.record.model

    @property
    def reference(self) -> bytes:
        return (self.folder / REFERENCE_FILE).read_bytes()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_file_name(name: str) -> str:
    """``name`` if it can be a file in a slot (no path, not hidden, not reserved)."""
    if _FILE_NAME.fullmatch(name) is None or name in RESERVED:
        raise SlotError(f"{name!r} cannot be a file name in a slot")
    return name


class SlotStore:
    """The A/B slots of one prototype under ``root`` (see the module docstring).

    Not thread-safe: one installer at a time writes to it. ``active`` may be read from
    any thread.
    """

    def __init__(self, root: Path, prototype: str) -> None:
        self.folder = Path(root) / check_ident(prototype, "prototype")
        self.active: ActiveSlot | None = None
        self._record: _ActiveFile | None = None  # active.json as last read or written

    # -- reading ------------------------------------------------------------------------
    def slot_folder(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise SlotError(f"no slot {slot!r}; slots are {', '.join(SLOTS)}")
        return self.folder / SLOTS_DIR / slot

    def _check(self, record: SlotRecord) -> ActiveSlot | None:
        """The slot if every file matches ``record``, else None (logged)."""
        folder = self.slot_folder(record.slot)
        expected = {
            METADATA_FILE: record.digest,
            record.model: record.model_sha256,
            REFERENCE_FILE: record.reference_sha256,
        }
        for name, digest in expected.items():
            path = folder / name
            try:
                actual = sha256_file(path)
            except OSError as e:
                log.warning("slot %s (release %d): %s unreadable (%s)", *_at(record), name, e)
                return None
            if actual != digest:
                log.warning("slot %s (release %d): %s is damaged", *_at(record), name)
                return None
        return ActiveSlot(record, folder, (folder / METADATA_FILE).read_bytes())

    def _read_active(self) -> _ActiveFile | None:
        path = self.folder / ACTIVE_FILE
        try:
            return _ActiveFile.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as e:
            log.error("%s is unreadable (%s); no model is active", path, e)
            return None

    def open(self) -> ActiveSlot | None:
        """Recover after a restart or a crash: drop unfinished temp files, check the active
        slot, fall back to the previous one if the active one is damaged. Returns (and
        sets ``active`` to) what the device can serve, or None."""
        self._drop_temp_files()
        self._record = self._read_active()
        self.active = None
        if self._record is None:
            return None
        current = SlotRecord.model_validate(self._record.model_dump(exclude={"previous"}))
        self.active = self._check(current)
        if self.active is not None:
            return self.active
        previous = self._record.previous
        fallback = self._check(previous) if previous is not None else None
        if fallback is None:
            log.error("release %d is damaged and no previous release is intact", current.version)
            return None
        log.warning(
            "release %d is damaged; serving the previous release %d again",
            current.version,
            fallback.record.version,
        )
        self._write_active(fallback.record, previous=None)
        self.active = fallback
        return fallback

    def _drop_temp_files(self) -> None:
        """Temp files of writes a crash interrupted (``takfl.files`` names them ``.name.*``)."""
        folders = [self.folder, *(self.folder / SLOTS_DIR / s for s in SLOTS)]
        for folder in folders:
            if folder.is_dir():
                for p in folder.glob(".*"):
                    if p.is_file():
                        p.unlink(missing_ok=True)

    # -- trust --------------------------------------------------------------------------
    def trusted(self) -> tuple[int, str | None]:
        """(version, metadata digest) of the newest release verified here; (0, None) if none.
        Never older than the active release."""
        path = self.folder / TRUSTED_FILE
        try:
            t = _TrustedFile.model_validate_json(path.read_bytes())
            found: tuple[int, str | None] = (t.version, t.digest)
        except FileNotFoundError:
            found = (0, None)
        except (OSError, ValidationError) as e:
            log.error("%s is unreadable (%s); trusting the active release", path, e)
            found = (0, None)
        active = self.active.record if self.active is not None else None
        if active is not None and active.version > found[0]:
            return active.version, active.digest
        return found

    def trust(self, version: int, digest: str) -> None:
        """Record verified metadata as the newest trusted (no-op unless newer)."""
        if version <= self.trusted()[0]:
            return
        body = _TrustedFile(version=version, digest=digest).model_dump_json()
        atomic_write_bytes(self.folder / TRUSTED_FILE, body.encode())

    # -- installing ---------------------------------------------------------------------
    def staging_slot(self) -> str:
        """The slot a new release goes into: the one not serving."""
        serving = self._record.slot if self._record is not None else SLOTS[1]
        return SLOTS[0] if serving == SLOTS[1] else SLOTS[1]

    def stage(self, wanted: dict[str, str]) -> list[str]:
        """Make the staging slot hold exactly the artifacts ``wanted`` (file name ->
        SHA-256): files already there are kept, files held in either slot with a wanted
        SHA-256 are copied, everything else (metadata.json included) is removed.
        Returns the names still missing, to be fetched and :meth:`put`."""
        for name in wanted:
            check_file_name(name)
        staging = self.slot_folder(self.staging_slot())
        staging.mkdir(parents=True, exist_ok=True)
        held = self._held_files()
        missing = []
        for name, digest in wanted.items():
            target = staging / name
            if target.is_file() and sha256_file(target) == digest:
                continue
            source = held.get(digest)
            if source is None:
                missing.append(name)
            else:
                atomic_write_bytes(target, source.read_bytes())
        for p in staging.iterdir():
            if p.name not in wanted:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        return missing

    def _held_files(self) -> dict[str, Path]:
        """SHA-256 -> a file holding those bytes, over both slots (artifacts only)."""
        held: dict[str, Path] = {}
        for slot in SLOTS:
            folder = self.slot_folder(slot)
            if not folder.is_dir():
                continue
            for p in sorted(folder.iterdir()):
                if p.is_file() and p.name not in RESERVED and not p.name.startswith("."):
                    held.setdefault(sha256_file(p), p)
        return held

    def put(self, name: str, data: bytes) -> Path:
        """Write an artifact into the staging slot (atomically); its path."""
        target = self.slot_folder(self.staging_slot()) / check_file_name(name)
        atomic_write_bytes(target, data)
        return target

    def put_metadata(self, data: bytes) -> None:
        """Write the release metadata into the staging slot, once its artifacts are there."""
        atomic_write_bytes(self.slot_folder(self.staging_slot()) / METADATA_FILE, data)

    def staged(self, record: SlotRecord) -> ActiveSlot:
        """The staging slot checked against ``record``; :class:`SlotError` if it does not
        hold exactly those files."""
        if record.slot != self.staging_slot():
            raise SlotError(f"slot {record.slot} is not the staging slot")
        slot = self._check(record)
        if slot is None:
            raise SlotError(f"slot {record.slot} does not hold release {record.version} intact")
        return slot

    def switch(self, record: SlotRecord) -> ActiveSlot:
        """Make the staging slot, holding ``record``, the active one (one rename); the slot
        served until now becomes ``previous``. Raises :class:`SlotError` if the staging
        slot does not match ``record``."""
        slot = self.staged(record)
        previous = self.active.record if self.active is not None else None
        self._write_active(record, previous=previous)
        self.active = slot
        return slot

    def _write_active(self, record: SlotRecord, *, previous: SlotRecord | None) -> None:
        doc = _ActiveFile(**record.model_dump(), previous=previous)
        atomic_write_bytes(self.folder / ACTIVE_FILE, json.dumps(doc.model_dump()).encode())
        self._record = doc


def _at(record: SlotRecord) -> tuple[str, int]:
    return record.slot, record.version
