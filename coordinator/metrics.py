"""Prometheus metrics of a running coordinator (``serve --metrics-port N``).

The endpoint binds 127.0.0.1 unless ``--metrics-bind`` says otherwise. It has no
authentication of its own, so another address needs TLS (prometheus-client's own
``certfile``/``keyfile``, and with ``client_cafile`` a client certificate the scraper
must present: :class:`MetricsTls`) or the explicit ``--metrics-plaintext``
(:func:`endpoint_problem`).

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
    takfl_telemetry_implausible_total{field} counter  reported values no device of the tier
                                                      can have measured (stored flagged,
                                                      coordinator.telemetry_log.plausibility)
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from coordinator.broker.net import LOOPBACK, is_loopback
from coordinator.observe import FleetObserver
from coordinator.telemetry_log import ANY_DEVICE
from takfl.wire.messages import UpdateHeader
from takfl.wire.telemetry import Plausibility, Telemetry, implausible

DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


@dataclass(frozen=True)
class MetricsTls:
    """TLS of the endpoint: its certificate and key, and optionally the CA whose client
    certificates it requires (mutual TLS: only a scraper holding one gets the metrics)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


def endpoint_problem(bind: str, tls: MetricsTls | None, plaintext: bool) -> str | None:
    """Why the endpoint may not start as asked, or None: an address other than loopback
    needs TLS or the explicit ``plaintext``."""
    if is_loopback(bind) or tls is not None or plaintext:
        return None
    return (
        f"the metrics endpoint on {bind} would be open to the network without "
        "authentication: give --metrics-cert-file and --metrics-key-file (TLS; with "
        "--metrics-client-ca, scrapers must present a certificate) or --metrics-plaintext"
    )


class PrometheusMetrics(FleetObserver):
    """The coordinator's metrics; :meth:`serve` exposes them over HTTP."""

    def __init__(
        self, prototypes: Sequence[str], bounds: Mapping[str, Plausibility] | None = None
    ) -> None:
        """``bounds``: what each prototype's devices can report (others: any device)."""
        self.bounds = dict(bounds or {})
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
        self.implausible = Counter(
            "takfl_telemetry_implausible",
            "Reported telemetry values no device of the tier can have measured.",
            ["field"],
            registry=r,
        )
        self._lock = threading.Lock()
        self._online: dict[str, tuple[str, bool]] = {}
        self._server: Any = None
        for p in prototypes:  # every tier shows up from the start, at zero
            self.online.labels(p).set(0)
            self.accepted_updates.labels(p)
            self.bytes_sent.labels(p)
            self.bytes_received.labels(p)
            self.registrations.labels(p)

    def serve(self, port: int, addr: str = LOOPBACK, tls: MetricsTls | None = None) -> int:
        """Start the HTTP(S) endpoint (a daemon thread); returns the bound port."""
        options: dict[str, Any] = {}
        if tls is not None:
            options = {"certfile": tls.cert_file, "keyfile": tls.key_file}
            if tls.client_ca_file is not None:
                options |= {"client_cafile": tls.client_ca_file, "client_auth_required": True}
        server, _thread = start_http_server(port, addr=addr, registry=self.registry, **options)
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- FleetObserver ------------------------------------------------------------------------
    def _flag(self, prototype: str, telemetry: Telemetry | None) -> None:
        if telemetry is not None:
            for name in implausible(telemetry, self.bounds.get(prototype, ANY_DEVICE)):
                self.implausible.labels(name).inc()

    def registered(self, agent: str, prototype: str, telemetry: Telemetry | None) -> None:
        self.registrations.labels(prototype).inc()
        self._flag(prototype, telemetry)

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
        self._flag(header.prototype, header.telemetry)

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
