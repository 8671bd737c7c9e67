"""Checks of a release against the device, before anything is fetched: pure functions
of the verified release, the device profile and the file system's answers."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path, PurePosixPath

from export.formats import format_of
from export.runtimes import runtime_status
from takfl.config.profile import DeviceProfile
from takfl.release.metadata import Release, ReleaseRefusal, ReleaseRefused
from takfl.release.reference import MAX_REFERENCE_BYTES

MB = 1024 * 1024
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def free_bytes(path: Path) -> int:
    """Free disk space for an unprivileged writer at ``path``."""
    return shutil.disk_usage(path).free


def model_file_name(release: Release) -> str:
    """The slot file name of the release's model: its target's base name."""
    return PurePosixPath(release.model.path).name


def storage_refusal(e: OSError) -> ReleaseRefused:
    """The refusal for a write that failed: ``no_space`` when the disk is full."""
    if e.errno in _NO_SPACE_ERRNOS:
        return ReleaseRefused(ReleaseRefusal.NO_SPACE, f"disk full while storing the release ({e})")
    return ReleaseRefused(ReleaseRefusal.DOWNLOAD_FAILED, f"cannot store the release ({e})")


def check_compatible(release: Release, profile: DeviceProfile) -> None:
    """Raise :class:`ReleaseRefused` unless this device can run the release: the
    profile's runtime and format, the runtime importable here, a model file of that
    format, within the profile's ``inference.memory_limit_mb``, and a reference file
    within :data:`MAX_REFERENCE_BYTES`."""
    spec, inference = release.spec, profile.inference
    if (spec.runtime, spec.format) != (inference.runtime, inference.format):
        raise ReleaseRefused(
            ReleaseRefusal.INCOMPATIBLE,
            f"release runs {spec.format} on {spec.runtime}; this device's profile "
            f"{profile.name} runs {inference.format} on {inference.runtime}",
        )
    usable, why = runtime_status(spec.runtime)
    if not usable:
        raise ReleaseRefused(ReleaseRefusal.INCOMPATIBLE, why)
    name = model_file_name(release)
    try:
        name_format = format_of(name)
    except ValueError as e:
        raise ReleaseRefused(ReleaseRefusal.MALFORMED, str(e)) from e
    if name_format != spec.format:
        raise ReleaseRefused(
            ReleaseRefusal.MALFORMED,
            f"model file {name} is not in the release's format, {spec.format}",
        )
    limit = inference.memory_limit_mb
    if limit is not None and release.model.length > limit * MB:
        raise ReleaseRefused(
            ReleaseRefusal.INCOMPATIBLE,
            f"model of {release.model.length / MB:.1f} MB over the profile's {limit} MB",
        )
    if release.reference.length > MAX_REFERENCE_BYTES:
        raise ReleaseRefused(
            ReleaseRefusal.MALFORMED,
            f"reference file of {release.reference.length} bytes over {MAX_REFERENCE_BYTES}",
        )
