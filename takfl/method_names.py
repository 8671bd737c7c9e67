"""The names under which algorithms, lambda strategies and privacy units are registered.

The registries (``takfl.algorithms``, ``takfl.lambdas``) hold the units, whose maths
needs torch; a config is read where torch must not load (an agent's ``validate``,
``profiles`` and ``doctor``). So their table of names lives here, free of torch: each
registry is built through :func:`registry`, which refuses units that differ from the
table, and the config checks a name with :func:`check_name`. Adding a method means
adding its name here and its unit there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

ALGORITHMS: tuple[str, ...] = ("takfl", "takfl-reg", "takfl-scaled", "feddf", "fedet", "fedavg")
LAMBDA_STRATEGIES: tuple[str, ...] = ("heuristic", "fixed", "search", "learned", "unsupervised")
PAPER_ALGORITHMS: tuple[str, ...] = ("fedavg", "feddf", "fedet", "takfl", "takfl-reg")  # Table 1
PRIVACY_MODES: tuple[str, ...] = (
    "plain",
    "central-dp",
    "secagg",
    "secagg-dp",
)  # takfl.privacy.modes
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")  # takfl.privacy.accountant
CLIPPING_MODES: tuple[str, ...] = ("fixed", "adaptive")  # takfl.privacy.clipping

U = TypeVar("U")


def unknown_name(kind: str, name: str, known: Sequence[str]) -> str:
    """The message for a name that is not registered, listing those that are."""
    return f"unknown {kind} {name!r}; choose from {', '.join(repr(k) for k in known)}"


def check_name(kind: str, name: str, known: Sequence[str]) -> str:
    """``name`` if it is one of ``known``; else a ValueError listing them."""
    if name not in known:
        raise ValueError(unknown_name(kind, name, known))
    return name


def lookup(kind: str, units: Mapping[str, U], name: str) -> U:
    """The unit registered as ``name`` in ``units`` (a :func:`registry`); else a ValueError
    listing the registered names."""
    unit = units.get(name)
    if unit is None:
        raise ValueError(unknown_name(kind, name, list(units)))
    return unit


def registry(
    kind: str, names: Sequence[str], units: Iterable[U], name_of: Callable[[U], str]
) -> dict[str, U]:
    """``units`` by name, in the order of ``names``.

    Raises:
        RuntimeError: the units' names are not exactly ``names`` (a unit without its
            name in the table, or a name without its unit).
    """
    by_name = {name_of(u): u for u in units}
    if sorted(by_name) != sorted(names):
        raise RuntimeError(
            f"the {kind} registry has {sorted(by_name)} but the name table "
            f"(takfl.method_names) has {sorted(names)}"
        )
    return {n: by_name[n] for n in names}
