"""One prototype's round under central DP: the clipped sum and its noised release.

:class:`ClippedSum` is a state accumulator the round engine feeds one update at a
time, like FedAvg's, with what DP-FedAvg needs instead of sample weighting: every
client counts once (a sample count would scale its influence past the clipping
bound), its delta is clipped before it is added, and :meth:`ClippedSum.result`
releases ``global + (sum + N(0, (z_Delta C)^2 I)) / n`` (BatchNorm variances then
raised to a floor, :func:`takfl.privacy.clipping.project_variances`) with ``n`` the number of
clients sampled, fixed before anyone answers (McMahan et al. 2018's fixed
denominator: dividing by the number who answered would make the sensitivity depend
on who answered). Only the running sum is kept; each client's delta is dropped
after :meth:`ClippedSum.add`.
"""

from __future__ import annotations

import torch

from takfl.privacy.clipping import (
    add_into,
    apply_mean,
    clip,
    floating_delta,
    gaussian_like,
    noised_fraction,
    project_variances,
)
from takfl.state import State, StateView


class ClippedSum:
    """Clipped deltas of one prototype's round, summed; released once with noise.

    ``reference``: the round's global model; ``bound``: C; ``denominator``: clients
    sampled (> 0); ``noise_std``: the standard deviation of the noise on the sum,
    z_Delta * C; ``generator``: the noise source.
    """

    def __init__(
        self,
        reference: StateView,
        *,
        bound: float,
        denominator: int,
        noise_std: float,
        generator: torch.Generator,
    ) -> None:
        if denominator < 1:
            raise ValueError(
                f"a private release needs at least one sampled client, got {denominator}"
            )
        self._reference = {k: v.detach().to("cpu").clone() for k, v in reference.items()}
        self._bound = bound
        self._denominator = denominator
        self._noise_std = noise_std
        self._generator = generator
        self._total: State = {}
        self._unclipped: list[bool] = []
        self._released: State | None = None

    @property
    def count(self) -> int:
        """Updates added so far."""
        return len(self._unclipped)

    @property
    def unclipped(self) -> int:
        """How many added updates were within the bound (before any noise)."""
        return sum(self._unclipped)

    def add(self, state: StateView, weight: float = 1.0) -> None:
        """Clip ``state - reference`` to the bound and add it; ``weight`` only has to be
        positive (every client counts once)."""
        if not weight > 0:
            raise ValueError(f"client weight must be positive, got {weight}")
        if self._released is not None:
            raise ValueError("this round's aggregate was already released")
        clipped, norm = clip(floating_delta(state, self._reference), self._bound)
        add_into(self._total, clipped)
        self._unclipped.append(norm <= self._bound)

    def result(self) -> State:
        """The released model (the noise is drawn once; later calls return the same)."""
        if self._released is None:
            floats = {k: v for k, v in self._reference.items() if v.is_floating_point()}
            noise = gaussian_like(floats, self._noise_std, self._generator)
            released = apply_mean(self._reference, self._total, noise, self._denominator)
            self._released = project_variances(released)
        return self._released

    def noised_unclipped_fraction(self, count_noise: float) -> float:
        """Andrew et al.'s b~ for this round: (unclipped + N(0, count_noise^2)) / n."""
        return noised_fraction(self._unclipped, self._denominator, count_noise, self._generator)
