"""Secure aggregation in simulation: the in-process clients' updates go through a real
SecAgg+ round (keys, sealed shares, masks, unmasking: :mod:`takfl.secagg`) and only
each prototype's sum reaches the engine, as over MQTT.

The wrapped transport trains the clients; this one takes their trained models as the
agents would, clips each delta against the round's global to the bound, runs the
round among the clients that answered, and hands the engine a :class:`SecureSum` per
prototype and round. The updates themselves are dropped here.
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np

from coordinator.transport.base import ClientUpdate, SecureSum, Task, Transport
from coordinator.transport.secure_rounds import TOO_FEW_SAMPLED, round_noise, round_params
from takfl.config.privacy import PrivacySpec
from takfl.secagg.client import clip_vector, noised_input
from takfl.secagg.inprocess import Dropouts, run_round
from takfl.secagg.messages import (
    SecAggFailure,
)
from takfl.secagg.vector import delta_vector
from takfl.state import State

log = logging.getLogger(__name__)

SIMULATION_RUN = "0" * 32  # the run id the round contexts of a simulation are bound to


def secure_round(
    run: str,
    round_id: int,
    prototype: str,
    spec: PrivacySpec,
    sampled: list[str],
    inputs: dict[str, np.ndarray],
    noise_multiplier: float = 0.0,
    rng: np.random.Generator | None = None,
) -> SecureSum:
    """One prototype's SecAgg+ round among ``sampled`` in one process; ``inputs`` are the
    clipped delta vectors of those that answered (the others drop out before keys).
    ``noise_multiplier`` > 0 (distributed DP): each client adds its share of the sum's
    noise, drawn from ``rng``."""
    sampled = sorted(sampled)
    answered = tuple(sorted(inputs))
    if len(sampled) < 2:
        return SecureSum(
            round_id=round_id,
            prototype=prototype,
            clients=(),
            answered=answered,
            failure=TOO_FEW_SAMPLED,
        )
    length = len(next(iter(inputs.values()))) if inputs else 0
    params = round_params(spec, run, round_id, prototype, sampled, length, noise_multiplier)
    noise = round_noise(spec, len(sampled), noise_multiplier)
    if noise > 0:
        draw = rng or np.random.default_rng()
        inputs = {c: noised_input(x, noise, params.bound, draw) for c, x in sorted(inputs.items())}
    try:
        total, trace = run_round(
            params, inputs, Dropouts(before_keys=frozenset(set(sampled) - set(inputs)))
        )
    except SecAggFailure as e:
        return SecureSum(
            round_id=round_id,
            prototype=prototype,
            clients=(),
            answered=answered,
            failure=f"{e.reason.value}: {e.detail}",
        )
    return SecureSum(
        round_id=round_id,
        prototype=prototype,
        clients=tuple(sorted(trace.server.inputs)),
        answered=answered,
        total=total,
    )


class SecureInProcess(Transport):
    """``inner`` trains; each prototype's round reaches the engine as one secure sum."""

    def __init__(
        self,
        inner: Transport,
        spec: PrivacySpec,
        run: str = SIMULATION_RUN,
        noise_seed: int | None = None,
    ) -> None:
        """``noise_seed``: distributed DP's noise, seeded for reproducible figures (None:
        the system's entropy)."""
        self.inner = inner
        self.spec = spec
        self.run = run
        self.noise_seed = noise_seed
        self._tasks: dict[tuple[int, str], dict[str, Task]] = {}
        self._ready: deque[SecureSum] = deque()

    def clients(self) -> dict[str, list[str]]:
        return self.inner.clients()

    def send_tasks(self, tasks: list[Task]) -> None:
        for t in tasks:
            self._tasks.setdefault((t.round_id, t.prototype), {})[t.client_id] = t
        self.inner.send_tasks(tasks)

    def next_update(self, timeout: float) -> ClientUpdate | SecureSum | None:
        if not self._ready:
            self._run_rounds(timeout)
        return self._ready.popleft() if self._ready else None

    def _run_rounds(self, timeout: float) -> None:
        """Collect every update the inner transport has, then one secure round per
        (round, prototype) whose tasks went out."""
        inputs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
        while (upd := self.inner.next_update(timeout)) is not None:
            assert isinstance(upd, ClientUpdate)
            task = self._tasks.get((upd.round_id, upd.prototype), {}).get(upd.client_id)
            if task is None:
                continue
            vector = delta_vector(upd.state, task.global_state)
            inputs.setdefault((upd.round_id, upd.prototype), {})[upd.client_id] = clip_vector(
                vector, self.spec.secagg.clip_norm
            )
        for key in sorted(self._tasks):
            round_id, prototype = key
            tasks = self._tasks.pop(key)
            z = max((t.noise_multiplier for t in tasks.values()), default=0.0)
            seed = (
                None
                if self.noise_seed is None
                else [self.noise_seed, round_id, *prototype.encode()]
            )
            self._ready.append(
                secure_round(
                    self.run,
                    round_id,
                    prototype,
                    self.spec,
                    list(tasks),
                    inputs.get(key, {}),
                    z,
                    np.random.default_rng(seed),
                )
            )

    def publish_global(self, round_id: int, prototype: str, state: State) -> None:
        self.inner.publish_global(round_id, prototype, state)

    def close(self) -> None:
        self.inner.close()
