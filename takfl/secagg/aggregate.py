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

import numpy as np

from takfl.secagg.checks import sum_problem
from takfl.secagg.vector import add_vector, vector_length
from takfl.state import State, StateView


class SecureMean:
    """The secure sum of one prototype's round, released as a mean; a state accumulator
    with nothing to add (``add`` refuses: no individual update may reach it)."""

    def __init__(self, reference: StateView, *, bound: float) -> None:
        self._reference = {k: v.detach().to("cpu").clone() for k, v in reference.items()}
        self.bound = bound
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
        problem = sum_problem(v, len(contributors), self.bound)
        if problem is not None:
            self.fail(problem)
            return
        self._total, self.contributors = v, tuple(contributors)

    def fail(self, reason: str) -> None:
        self._total, self.contributors, self.failure = None, (), reason

    def result(self) -> State:
        if self._total is None:
            raise ValueError(f"no secure sum to release ({self.failure or 'none arrived'})")
        return add_vector(self._reference, self._total, 1.0 / len(self.contributors))
