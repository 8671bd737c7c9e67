"""Prometheus metrics of a running coordinator (``serve --metrics-port N``).

Metric names (all in one registry per coordinator, served at ``/metrics``):

    takfl_round                              gauge    round in progress (0 before round 1)
    takfl_rounds_completed_total             counter  rounds whose server step finished
    takfl_round_duration_seconds             histogram wall time of a round, tasks to saved models
    takfl_registrations_total{prototype}     counter  accepted registrations
    takfl_agents_online{prototype}           gauge    provisioned agents whose status is online
    takfl_updates_accepted_total{prototype}  counter  updates handed to the engine
    takfl_updates_refused_total{reason}      counter  refused registrations and updates, by
                                                      Refusal value (bad_signature, expired, ...)
    takfl_bytes_sent_total{prototype}        counter  global-model bytes sent with tasks
    takfl_bytes_received_total{prototype}    counter  accepted update-blob bytes
    takfl_privacy_epsilon{prototype}         gauge    epsilon spent so far at the run's delta
                                                      (private modes; absent in plain mode)
    takfl_privacy_delta                      gauge    the delta that epsilon is stated at
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from coordinator.observe import FleetObserver
from takfl.wire.messages import UpdateHeader
from takfl.wire.telemetry import Telemetry

DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class PrometheusMetrics(FleetObserver):
    """The coordinator's metrics; :meth:`serve` exposes them over HTTP."""

    def __init__(self, prototypes: Sequence[str]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.round = Gauge("takfl_round", "Round in progress (0 before round 1).", registry=r)
        self.rounds = Counter(
            "takfl_rounds_completed", "Rounds whose server step finished.", registry=r
        )
        self.duration = Histogram(
            "takfl_round_duration_seconds",
            "Wall time of a round, from its tasks to its saved models.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.registrations = Counter(
            "takfl_registrations", "Accepted registrations.", ["prototype"], registry=r
        )
        self.online = Gauge(
            "takfl_agents_online", "Provisioned agents online.", ["prototype"], registry=r
        )
        self.accepted_updates = Counter(
            "takfl_updates_accepted", "Updates handed to the engine.", ["prototype"], registry=r
        )
        self.refused_updates = Counter(
            "takfl_updates_refused", "Refused registrations and updates.", ["reason"], registry=r
        )
        self.bytes_sent = Counter(
            "takfl_bytes_sent", "Global-model bytes sent with tasks.", ["prototype"], registry=r
        )
        self.bytes_received = Counter(
            "takfl_bytes_received", "Accepted update-blob bytes.", ["prototype"], registry=r
        )
        self.epsilon = Gauge(
            "takfl_privacy_epsilon",
            "Epsilon spent so far at the run's delta (central DP).",
            ["prototype"],
            registry=r,
        )
        self.delta = Gauge("takfl_privacy_delta", "The delta epsilon is stated at.", registry=r)
        self._lock = threading.Lock()
        self._online: dict[str, tuple[str, bool]] = {}
        self._server: Any = None
        for p in prototypes:  # every tier shows up from the start, at zero
            self.online.labels(p).set(0)
            self.accepted_updates.labels(p)
            self.bytes_sent.labels(p)
            self.bytes_received.labels(p)
            self.registrations.labels(p)

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Start the HTTP endpoint (a daemon thread); returns the bound port."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- FleetObserver ------------------------------------------------------------------------
    def registered(self, agent: str, prototype: str, telemetry: Telemetry | None) -> None:
        self.registrations.labels(prototype).inc()

    def presence(self, agent: str, prototype: str, online: bool) -> None:
        with self._lock:
            self._online[agent] = (prototype, online)
            count = sum(1 for p, on in self._online.values() if p == prototype and on)
            self.online.labels(prototype).set(count)

    def tasks_sent(self, round_id: int, prototype: str, count: int, blob_bytes: int) -> None:
        self.bytes_sent.labels(prototype).inc(count * blob_bytes)

    def accepted(self, header: UpdateHeader) -> None:
        self.accepted_updates.labels(header.prototype).inc()
        self.bytes_received.labels(header.prototype).inc(header.blob.size)

    def refused(self, agent: str, prototype: str | None, round_id: int | None, reason: str) -> None:
        self.refused_updates.labels(reason).inc()

    def round_started(self, round_id: int, plan: Mapping[str, Sequence[str]]) -> None:
        self.round.set(round_id)

    def round_finished(self, round_id: int, duration_s: float) -> None:
        self.rounds.inc()
        self.duration.observe(duration_s)

    def privacy_spent(self, round_id: int, epsilon: Mapping[str, float], delta: float) -> None:
        for proto, eps in epsilon.items():
            self.epsilon.labels(proto).set(eps)
        self.delta.set(delta)
