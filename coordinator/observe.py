"""Observers of a federation: what the transport and the run tell the telemetry log and
the Prometheus metrics.

The MQTT transport and :class:`~coordinator.service.FederationRun` call a
:class:`FleetObserver` at a handful of points; every method is a no-op here, so
an observer implements only what it needs. Calls come from the transport's
dispatcher thread and from the engine's thread: implementations lock their state.
An observer must never raise into the transport (:class:`Observers` logs and
swallows its members' errors).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from takfl.wire.messages import UpdateHeader
from takfl.wire.telemetry import Telemetry

log = logging.getLogger(__name__)

# Refusal reasons that mean "the update came too late" in the straggler timeline.
LATE_REASONS = frozenset({"expired", "stale_round"})


class FleetObserver:
    """Hooks of a federation run (all optional)."""

    def registered(self, agent: str, prototype: str, telemetry: Telemetry | None) -> None:
        """An agent's registration was accepted."""

    def presence(self, agent: str, prototype: str, online: bool) -> None:
        """A provisioned agent's retained status changed."""

    def tasks_sent(self, round_id: int, prototype: str, count: int, blob_bytes: int) -> None:
        """``count`` tasks of one prototype went out, each with a ``blob_bytes`` global model."""

    def accepted(self, header: UpdateHeader) -> None:
        """An update passed every check and was handed to the engine."""

    def refused(self, agent: str, prototype: str | None, round_id: int | None, reason: str) -> None:
        """A registration or update was refused (``reason``: a Refusal value)."""

    def round_started(self, round_id: int, plan: Mapping[str, Sequence[str]]) -> None:
        """Tasks of ``round_id`` are about to go out to the clients in ``plan``."""

    def round_finished(self, round_id: int, duration_s: float) -> None:
        """The server step of ``round_id`` is done and its models are saved."""

    def privacy_spent(self, round_id: int, epsilon: Mapping[str, float], delta: float) -> None:
        """After ``round_id``, each prototype has spent ``epsilon`` at ``delta`` (private
        modes only)."""


class Observers(FleetObserver):
    """Several observers as one; an observer's failure is logged, never raised."""

    def __init__(self, members: Sequence[FleetObserver]) -> None:
        self.members = list(members)

    def _each(self, name: str, *args: object) -> None:
        for m in self.members:
            try:
                getattr(m, name)(*args)
            except Exception:
                log.exception("observer %s.%s failed", type(m).__name__, name)

    def registered(self, agent: str, prototype: str, telemetry: Telemetry | None) -> None:
        self._each("registered", agent, prototype, telemetry)

    def presence(self, agent: str, prototype: str, online: bool) -> None:
        self._each("presence", agent, prototype, online)

    def tasks_sent(self, round_id: int, prototype: str, count: int, blob_bytes: int) -> None:
        self._each("tasks_sent", round_id, prototype, count, blob_bytes)

    def accepted(self, header: UpdateHeader) -> None:
        self._each("accepted", header)

    def refused(self, agent: str, prototype: str | None, round_id: int | None, reason: str) -> None:
        self._each("refused", agent, prototype, round_id, reason)

    def round_started(self, round_id: int, plan: Mapping[str, Sequence[str]]) -> None:
        self._each("round_started", round_id, plan)

    def round_finished(self, round_id: int, duration_s: float) -> None:
        self._each("round_finished", round_id, duration_s)

    def privacy_spent(self, round_id: int, epsilon: Mapping[str, float], delta: float) -> None:
        self._each("privacy_spent", round_id, epsilon, delta)
