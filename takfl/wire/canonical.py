"""Canonical JSON: the exact bytes a signature covers and the form every message has on
the wire. One pure function each way, used by the sender and the receiver alike.

Parsing (:func:`parse_json`) keeps what a sender wrote: an integer token stays an
integer, a token with a fraction or an exponent stays a float, so a receiver rebuilds the
sender's bytes from the object it received (never from its own typed model, which would
fill defaults or turn ``1`` into ``1.0``). It refuses what has no canonical form:
invalid UTF-8, duplicate keys, NaN/Infinity, numbers that overflow to infinity, lone
surrogates.

Canonical bytes (:func:`canonical_bytes`): keys sorted by code point at every level,
separators ``,`` and ``:`` with no whitespace, ASCII only (``\\uXXXX`` escapes, lower-case
hex, surrogate pairs above U+FFFF; ``"`` ``\\`` and the controls ``\\b \\f \\n \\r \\t`` as
short escapes, every other character outside U+0020..U+007E as ``\\uXXXX``; ``/`` is not
escaped), integers as written, ``true``/``false``/``null``, and floats by
:func:`format_float`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from takfl.wire.errors import MalformedMessage


def format_float(x: float) -> str:
    """The canonical text of a finite float: the shortest decimal that reads back as the
    same double (ties to the closest), positional with at least one fractional digit for
    ``1e-4 <= |x| < 1e16`` (and for zero: ``0.0``, ``-0.0``), else ``d[.ddd]e±XX`` with
    at least two exponent digits (``5e-05``, ``1e+16``, ``1.5e-07``). Python's ``repr``."""
    if not math.isfinite(x):
        raise ValueError(f"{x!r} has no canonical form")
    return repr(float(x))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of the double range")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_strings(value: Any) -> None:
    """Raise ValueError on a lone surrogate in any key or string."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            v.encode("utf-8")  # UnicodeEncodeError (a ValueError) on a lone surrogate
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def parse_json(data: bytes | bytearray | str) -> Any:
    """The JSON value in ``data`` (UTF-8), ints and floats as written.

    Raises:
        MalformedMessage: not UTF-8 JSON, or one of the refusals in the module docstring.
    """
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_float=_finite,
            parse_constant=_refuse_constant,
        )
        _check_strings(value)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeError included
        raise MalformedMessage(f"not canonical-able JSON: {e}") from e
    return value


def canonical_bytes(value: Any) -> bytes:
    """The canonical JSON bytes of ``value`` (dicts, lists, str, int, float, bool, None)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")
