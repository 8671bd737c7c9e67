"""The round engine's view of the clients: an abstract transport.

Two implementations: in-process (simulation; virtual clients run the same
``takfl.training.train_local`` an agent runs) and MQTT (real agents). The
engine never knows which one it talks to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from takfl.config.base import ModelSpec
from takfl.config.profile import TrainingSpec
from takfl.state import State
from takfl.wire.bounds import StateBounds
from takfl.wire.validation import Verdict


@dataclass(kw_only=True)
class Task:
    """One client's work for one round."""

    round_id: int
    prototype: str
    client_id: str
    model: ModelSpec
    global_state: State  # the prototype's global weights, CPU
    deadline: float  # unix time after which the update is no longer wanted
    seed: int = 0  # local-training seed: the same task trains identically everywhere
    training: TrainingSpec | None = None  # epochs/batch/lr dictated for this prototype
    # secagg-dp: the noise multiplier z of the prototype's sum; its clients add their share
    noise_multiplier: float = 0.0


@dataclass(kw_only=True)
class ClientUpdate:
    """A client's validated answer to a task: full trained weights (the transport
    reconstructs them from a delta when it carried one)."""

    round_id: int
    prototype: str
    client_id: str
    num_samples: int
    state: State
    metrics: dict[str, float] = field(default_factory=dict)  # train loss, seconds, ...


@dataclass(frozen=True, kw_only=True)
class SecureSum:
    """A prototype's round under secure aggregation, as the transport hands it on: the
    decoded sum of the surviving clients' clipped deltas (float64, laid out as
    :func:`takfl.secagg.vector.delta_vector` lays one out), or ``failure`` (why there
    is none). No individual update ever reaches the engine in this mode."""

    round_id: int
    prototype: str
    clients: tuple[str, ...]  # whose inputs the sum holds
    answered: tuple[str, ...]  # every sampled client that took part in some stage
    total: np.ndarray | None = field(default=None, repr=False)
    failure: str | None = None


class Transport(ABC):
    """How the engine reaches clients. Implementations must be safe to call from
    the engine's thread only; they may run their own threads internally."""

    @abstractmethod
    def clients(self) -> dict[str, list[str]]:
        """Clients currently available, by prototype."""

    @abstractmethod
    def send_tasks(self, tasks: list[Task]) -> None:
        """Deliver tasks; returns without waiting for the work."""

    @abstractmethod
    def next_update(self, timeout: float) -> ClientUpdate | SecureSum | None:
        """The next validated update of the current round, or None after ``timeout`` s;
        under secure aggregation, each prototype's :class:`SecureSum` instead.

        Refused updates are logged and counted by the transport, never returned.
        """

    def publish_global(self, round_id: int, prototype: str, state: State) -> None:
        """Announce a prototype's new global model (no-op where nobody listens)."""
        return None

    def bound_updates(self, bounds: Mapping[str, StateBounds]) -> None:
        """The bounds each prototype's updates must meet (from the run's initial models),
        for a transport that checks updates on receipt (no-op otherwise)."""
        return None

    def refused(self, update: ClientUpdate, verdict: Verdict) -> None:
        """The engine refused ``update`` after the transport handed it on (counted and
        reported where the transport keeps refusals; no-op otherwise)."""
        return None

    def refused_answers(self) -> list[tuple[int, str]]:
        """(round, client id) of every update the transport refused on receipt since the
        last call, when the refusal is the client's final answer to its task (the engine
        stops awaiting it); empty where the transport refuses nothing itself."""
        return []

    def close(self) -> None:
        return None
