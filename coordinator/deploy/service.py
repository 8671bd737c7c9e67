"""The release service: the coordinator's MQTT end of model releases.

Thin glue in the style of :mod:`coordinator.transport.mqtt`: every handler reads
(``coordinator.transport.inbound.read``: decode, agent from the topic, HMAC under the
agent's secret) -> asks :class:`~coordinator.deploy.control.ReleaseControl` -> publishes
its :class:`~coordinator.deploy.control.Decision`. Routes::

    up/+/release    ReleaseReport     -> control.report (fresh, of this command's run)
    up/+/request    ChunkRequest      -> chunks of a release blob offered to that agent
                                         (fresh, of this run; a BlobSender with the
                                         coordinator's resend limits)
    every tick      timeouts, re-offers, rollback offers
    down/<a>/release  ReleaseOffer (signed with the agent's secret; not retained: the
                      desk sends an unanswered offer again)
    down/<a>/chunk    artifact chunks, as the agent asks for them

**Broker login.** The service logs in as its own user, :data:`RELEASE_USER`, never as
the coordinator, with a client id of its own (``takfl-release-<random>``), so two
release commands, or a release and a running ``serve``, never take each other's session
over (on Mosquitto: on its service listener, where client ids are the clients'; on an
agents' listener the broker makes the login the client id, see
:mod:`coordinator.broker.mosquitto`). The release user's ACL
(``coordinator.broker.acl.release_grants``) allows only what this module does: write
``down/+/release`` and ``down/+/chunk``, read ``up/+/release`` and ``up/+/request``.
``provision`` writes its password to ``release.password``; the embedded broker
(``coordinator.serve.embedded_access``) knows the same login. ``serve`` and the release
service may run side by side: both read ``up/+/request`` and each answers only for the
blobs it sent, of its own run.

The session is clean (not persistent): a release command is short-lived, and a
persistent session would make the broker queue every agent's chunk requests for it
while no release runs. Reports lost during a reconnect are covered by the per-device
timeout; lost offers by the re-offers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from coordinator.deploy.control import Decision, ReleaseControl
from coordinator.transport.inbound import read
from takfl.mqtt.blobs import BlobSender, BlobStore
from takfl.mqtt.client import MqttClient, MqttSettings, unique_client_id
from takfl.mqtt.ratelimit import ResendLimiter, ResendLimits
from takfl.wire.freshness import ReplayGuard
from takfl.wire.messages import ChunkRequest, encode_message
from takfl.wire.release import ReleaseReport
from takfl.wire.topics import Down, Topics, Up
from takfl.wire.validation import AgentRecord

log = logging.getLogger(__name__)

RELEASE_USER = "takfl-release"  # broker username of the release service


@dataclass(frozen=True, kw_only=True)
class ReleasePolicy:
    max_kept_blobs: int = 64  # release blobs kept to answer chunk requests
    max_kept_bytes: int = 4 * 1024**3
    resend: ResendLimits = field(default_factory=ResendLimits)  # answers to chunk requests
    connect_timeout_s: float = 30.0


class ReleaseService:
    """Publishes ``control``'s decisions and feeds it what agents send.
    ``run`` connects, drives the rollouts to their end (or ``timeout_s``), disconnects."""

    def __init__(
        self,
        settings: MqttSettings,
        fleet: str,
        registry: Mapping[str, AgentRecord],
        control: ReleaseControl,
        *,
        policy: ReleasePolicy | None = None,
        client_id: str | None = None,
        report: Callable[[str], None] = print,
    ) -> None:
        """``client_id``: default ``takfl-release-<random>`` (unique per command)."""
        self.topics = Topics(fleet)
        self.registry = registry
        self.control = control
        self.policy = policy or ReleasePolicy()
        self.report = report
        self.guard = ReplayGuard()
        client_id = client_id or unique_client_id(RELEASE_USER)
        self.client = MqttClient(settings, client_id, persistent=False)
        self.sender = BlobSender(
            self.client,
            BlobStore(self.policy.max_kept_blobs, self.policy.max_kept_bytes),
            ResendLimiter(self.policy.resend),
        )
        self.chunks_sent = 0
        self._done = threading.Event()
        self.client.route(self.topics.up_filter(Up.RELEASE), self._on_report)
        self.client.route(self.topics.up_filter(Up.REQUEST), self._on_request)
        self.client.every_tick(self._tick)

    def run(self, timeout_s: float) -> bool:
        """Roll out until every rollout finished (True) or ``timeout_s`` passed (False:
        the unfinished ones are stopped where they stand)."""
        self.client.start(timeout=self.policy.connect_timeout_s)
        try:
            self._publish(self.control.start())
            finished = self._done.wait(timeout_s)
            if not finished:
                self._publish(self.control.stop(f"the --timeout of {timeout_s:.0f}s passed"))
        finally:
            self.client.stop()
        return finished

    # -- publishing ---------------------------------------------------------------------
    def _publish(self, decision: Decision) -> None:
        for published in decision.keep:
            for blob in published.blobs.values():
                self.sender.keep(blob, published.chunk_size)
        for agent, offer in decision.offers:
            self.client.publish(self.topics.down(agent, Down.RELEASE), encode_message(offer))
        for line in decision.lines:
            try:
                self.report(line)
            except Exception:  # a failing printer must not keep the rollout from ending
                log.exception("cannot report %r", line)
        if self.control.done:
            self._done.set()

    # -- handlers (dispatcher thread) -------------------------------------------------------
    def _on_report(self, topic: str, payload: bytes) -> None:
        received = read(ReleaseReport, self.topics, topic, payload, self.registry, guard=self.guard)
        self._publish(self.control.report(received))

    def _on_request(self, topic: str, payload: bytes) -> None:
        received = read(ChunkRequest, self.topics, topic, payload, self.registry, guard=self.guard)
        agent, request = received.agent, received.message
        if not received.ok or agent is None or request is None:
            log.info("ignored chunk request on %s: %s", topic, received.verdict)
            return
        if request.run != self.control.run_id:
            return  # serve's, or of another release command
        if self.control.may_fetch(agent, request.digest):  # else: nobody's
            self.chunks_sent += self.sender.answer(
                self.topics.down(agent, Down.CHUNK), request, agent
            )

    def _tick(self) -> None:
        self._publish(self.control.tick())
