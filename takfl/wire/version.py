"""The protocol version every message carries (``"protocol": "<major>.<minor>"``) and the
rule that decides how a receiver treats a message of another version.

- same major, same or lower minor: decoded strictly (unknown keys refused);
- same major, higher minor: decoded leniently: a minor version only adds optional fields
  (and reason values), so the receiver ignores what it does not know; the signature still
  covers every key, since the signed bytes come from the received object;
- another major: not decoded (:class:`takfl.wire.errors.UnsupportedVersion`); the one
  message read across majors is the ``unsupported_version`` refusal of a registration.

``PROTOCOL`` is read at call time (:func:`current`), never copied at import.
"""

from __future__ import annotations

import re
from enum import Enum

PROTOCOL = "1.0"  # the version this code speaks
VERSION_PATTERN = r"^(0|[1-9][0-9]{0,3})\.(0|[1-9][0-9]{0,3})$"
_VERSION = re.compile(VERSION_PATTERN)


class Compatibility(str, Enum):
    """How a message of some version is read by this code."""

    STRICT = "strict"  # same major, same or lower minor
    NEWER_MINOR = "newer_minor"  # same major, higher minor: unknown keys ignored
    OTHER_MAJOR = "other_major"  # not readable


def current() -> str:
    """The version this process speaks (``PROTOCOL``)."""
    return PROTOCOL


def parse_version(text: object) -> tuple[int, int]:
    """``"1.0"`` -> ``(1, 0)``; ValueError for anything else (no leading zeros, no sign)."""
    if not isinstance(text, str) or _VERSION.fullmatch(text) is None:
        raise ValueError(f"protocol version {text!r} is not '<major>.<minor>'")
    major, minor = text.split(".")
    return int(major), int(minor)


def compatibility(theirs: str, ours: str | None = None) -> Compatibility:
    """How a message of version ``theirs`` is read by code speaking ``ours`` (default:
    :func:`current`). Raises ValueError when ``theirs`` is not a version."""
    their_major, their_minor = parse_version(theirs)
    our_major, our_minor = parse_version(current() if ours is None else ours)
    if their_major != our_major:
        return Compatibility.OTHER_MAJOR
    return Compatibility.NEWER_MINOR if their_minor > our_minor else Compatibility.STRICT
