"""The privacy spent by a prototype's releases, tracked by Opacus's accountants.

No accounting is done here: a :class:`PrivacyLedger` keeps the history of
(noise multiplier, sampling rate, steps) of one prototype's releases and asks the
accountant registered under its name (Opacus's RDP, Mironov 2017 with the
subsampled-Gaussian bound of Mironov et al. 2019, or PRV, Gopi et al. 2021) for
epsilon at a delta. The sampling rate is the chance that a given client of the
prototype is sampled in a round; the accountants treat it as Poisson sampling, and
one client's whole contribution to a round (its clipped delta) is the unit protected
(add/remove-one-client adjacency).

Opacus is imported where it is used (the coordinator extra): an agent never needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from takfl.method_names import ACCOUNTANTS, lookup, registry


@dataclass(frozen=True, kw_only=True)
class AccountantUnit:
    name: str
    reference: str
    build: Callable[[], Any]  # -> an Opacus IAccountant
    opacus_name: str  # its name in opacus.accountants.utils.get_noise_multiplier


def _rdp() -> Any:
    from opacus.accountants import RDPAccountant

    return RDPAccountant()


def _prv() -> Any:
    from opacus.accountants import PRVAccountant

    return PRVAccountant()


_UNITS: dict[str, AccountantUnit] = registry(
    "accountant",
    ACCOUNTANTS,
    (
        AccountantUnit(
            name="rdp",
            reference="Renyi DP of the subsampled Gaussian, Mironov et al. 2019 (Opacus)",
            build=_rdp,
            opacus_name="rdp",
        ),
        AccountantUnit(
            name="prv",
            reference="privacy random variables, Gopi et al. 2021 (Opacus)",
            build=_prv,
            opacus_name="prv",
        ),
    ),
    lambda unit: unit.name,
)


def accountant_unit(name: str) -> AccountantUnit:
    """The registered accountant ``name``; ValueError listing the known ones."""
    return lookup("accountant", _UNITS, name)


Step = tuple[float, float, int]  # (noise multiplier, sampling rate, rounds)


class PrivacyLedger:
    """The releases of one prototype and the epsilon they cost."""

    def __init__(self, accountant: str, history: Iterable[Sequence[float]] = ()) -> None:
        self.unit = accountant_unit(accountant)
        self._history: list[Step] = [(float(z), float(q), int(n)) for z, q, n in history]

    @property
    def history(self) -> list[Step]:
        """(noise multiplier, sampling rate, rounds) entries, consecutive equal ones merged."""
        return list(self._history)

    @property
    def rounds(self) -> int:
        return sum(n for _, _, n in self._history)

    def record(self, noise_multiplier: float, sample_rate: float, rounds: int = 1) -> None:
        """One (or ``rounds``) more releases at these settings."""
        _check(noise_multiplier, sample_rate)
        if self._history and self._history[-1][:2] == (noise_multiplier, sample_rate):
            z, q, n = self._history[-1]
            self._history[-1] = (z, q, n + rounds)
        else:
            self._history.append((float(noise_multiplier), float(sample_rate), int(rounds)))

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before any release)."""
        return epsilon_of(self.unit.name, self._history, delta)

    def epsilon_after(
        self, noise_multiplier: float, sample_rate: float, rounds: int, delta: float
    ) -> float:
        """Epsilon at ``delta`` if ``rounds`` more releases at these settings were made."""
        _check(noise_multiplier, sample_rate)
        more: list[Step] = [*self._history, (noise_multiplier, sample_rate, rounds)]
        return epsilon_of(self.unit.name, more, delta)


def _check(noise_multiplier: float, sample_rate: float) -> None:
    if not noise_multiplier > 0:
        raise ValueError(f"noise multiplier must be positive, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sampling rate must be in (0, 1], got {sample_rate}")


def epsilon_of(accountant: str, history: Sequence[Step], delta: float) -> float:
    """Epsilon at ``delta`` of a history of releases, by the named Opacus accountant."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    steps = [(z, q, n) for z, q, n in history if n > 0]
    if not steps:
        return 0.0
    acc = accountant_unit(accountant).build()
    acc.history = list(steps)
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(
    accountant: str, target_epsilon: float, delta: float, sample_rate: float, rounds: int
) -> float:
    """The smallest noise multiplier (within Opacus's tolerance, 0.01 in epsilon) whose
    ``rounds`` releases at ``sample_rate`` cost at most ``target_epsilon`` at ``delta``."""
    from opacus.accountants.utils import get_noise_multiplier

    _check(1.0, sample_rate)
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=rounds,
            accountant=accountant_unit(accountant).opacus_name,
        )
    )
