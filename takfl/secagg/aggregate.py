"""One prototype's round under secure aggregation, as the round engine sees it.

The engine never gets an individual update: the transport hands it the decoded sum of
the round's surviving clients (each clipped to L2 norm C by its sender) or the reason
there is none. :class:`SecureMean` turns it into the prototype's new model,
``global + sum / contributors`` over the floating entries, after checking what can still
be checked (:func:`takfl.secagg.checks.sum_problem`: finite, norm within
``contributors x C``). Every client counts once: weighting by sample counts would need
each client to scale its own input, and its count to be summed securely too.
"""

from __future__ import annotations

import math

import numpy as np

from takfl.privacy.clipping import project_variances
from takfl.secagg.checks import sum_problem
from takfl.secagg.vector import add_vector, vector_length
from takfl.state import State, StateView

NOISE_CHECK = 2.0  # a noised sum's norm may pass n C by this many times its noise's norm


class SecureMean:
    """The secure sum of one prototype's round, released as a mean; a state accumulator
    with nothing to add (``add`` refuses: no individual update may reach it).

    Distributed DP (``noise_std`` > 0: what each client added per coordinate): the mean
    is over ``denominator``, the clients sampled (fixed before anyone answered, as in
    central DP), BatchNorm variances are raised to a floor (post-processing), and the
    sum's norm may pass ``contributors x bound`` by the noise's expected norm, twice."""

    def __init__(
        self,
        reference: StateView,
        *,
        bound: float,
        denominator: int | None = None,
        noise_std: float = 0.0,
    ) -> None:
        self._reference = {k: v.detach().to("cpu").clone() for k, v in reference.items()}
        self.bound = bound
        self.denominator = denominator
        self.noise_std = noise_std
        self.length = vector_length(self._reference)
        self._total: np.ndarray | None = None
        self.contributors: tuple[str, ...] = ()
        self.failure: str | None = None

    @property
    def count(self) -> int:
        """Clients in the sum (0 before it arrived or when the round failed)."""
        return len(self.contributors) if self._total is not None else 0

    @property
    def releases(self) -> bool:
        return self._total is not None

    def add(self, state: StateView, weight: float = 1.0) -> None:
        raise TypeError("secure aggregation takes the round's sum, never one update")

    def set_sum(self, total: np.ndarray, contributors: tuple[str, ...]) -> None:
        """The decoded sum of ``contributors``' clipped deltas; refused (the round then
        fails with the reason) when it cannot be the sum of honest clipped updates."""
        v = np.asarray(total, dtype=np.float64).reshape(-1)
        if v.size != self.length:
            self.fail(f"a sum of {v.size} values for a model of {self.length}")
            return
        m = len(contributors)
        slack = NOISE_CHECK * math.sqrt(m * v.size) * self.noise_std / max(m * self.bound, 1e-12)
        problem = sum_problem(v, m, self.bound, slack=max(1e-6, slack))
        if problem is not None:
            self.fail(problem)
            return
        self._total, self.contributors = v, tuple(contributors)

    def fail(self, reason: str) -> None:
        self._total, self.contributors, self.failure = None, (), reason

    def result(self) -> State:
        if self._total is None:
            raise ValueError(f"no secure sum to release ({self.failure or 'none arrived'})")
        n = self.denominator or len(self.contributors)
        released = add_vector(self._reference, self._total, 1.0 / n)
        return project_variances(released) if self.noise_std > 0 else released
