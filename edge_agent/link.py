"""The agent's end of the MQTT protocol: register, receive tasks with their global
model, send signed compressed updates.

Usage::

    with AgentLink(settings, "lab", identity) as link:
        task = link.next_task(timeout=60)          # TaskMessage + decoded global state
        ...train from task.global_state...
        header = link.send_update(task, trained_state, num_samples=n)
        ack = link.wait_ack(header.blob.digest, timeout=60)

Thin glue between the broker and the units that decide, as the coordinator's end is: a
topic route table whose handlers read the message once (:class:`InboundReader`: signed
with this agent's secret and addressed to it; anything else is ignored and logged), ask
a unit and publish its answer. :class:`TaskIntake` judges tasks and reassembles their
global models and training programs; :class:`UpdateOutbox` keeps the updates sent until
acknowledged and answers chunk requests within the :class:`ResendLimits` of the policy.

Presence and registration: :class:`RegistrationBook` (an agent registers when the
coordinator's status says it is online on a connection not yet registered with; the
registration is not retained). Everything the coordinator sends must be fresh (its
``sent_at`` within the replay window, its nonce new) and of the run it concerns
(:class:`RunFilter`). A task is acknowledged on receipt; its global blob is reassembled
and missing chunks are asked for again. An update header is announced again after
15 s, 30 s, 60 s, then every 120 s (``LinkPolicy.update_retry``, jittered) until the
coordinator acknowledges it or the task's deadline passes;
the blob stays in a bounded store to answer chunk requests. The latest announcement of
the prototype's new global model is kept (``wait_global``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import torch

from edge_agent.codec_state import CodecState
from edge_agent.identity import AgentIdentity
from edge_agent.inbound import InboundReader
from edge_agent.intake import COORDINATOR, Decision, ReceivedTask, TaskIntake
from edge_agent.link_policy import LinkCounters, LinkPolicy
from edge_agent.outbox import UpdateOutbox
from edge_agent.presence import RegistrationBook, RunFilter, coordinator_presence
from edge_agent.programs import ProgramCache
from edge_agent.secure_round import SecureInbox, SecureSend
from takfl.mqtt.blobs import BlobSender, Missing
from takfl.mqtt.client import MqttClient, MqttSettings, Will
from takfl.wire.errors import WireError
from takfl.wire.messages import (
    Ack,
    ChunkRequest,
    GlobalAnnouncement,
    Registration,
    SignedMessage,
    UpdateHeader,
    decode_chunk,
    encode_message,
)
from takfl.wire.secure import SecAggDelivery, SecAggRoster, SecAggUnmask
from takfl.wire.signing import sign
from takfl.wire.telemetry import Telemetry
from takfl.wire.topics import Down, Topics, Up, check_ident
from takfl.wire.update import PreparedUpdate, prepare_update

if TYPE_CHECKING:  # the release side is imported only by agents that install releases
    from edge_agent.deploy.deployment import Deployment
    from edge_agent.serving.stats import StatusSchedule

__all__ = [
    "COORDINATOR",
    "REGISTER_KEY",
    "AgentIdentity",
    "AgentLink",
    "LinkCounters",
    "LinkPolicy",
    "ReceivedTask",
]

log = logging.getLogger(__name__)

REGISTER_KEY = "register"  # key of the registration ack in wait_ack
ClientFactory = Callable[..., MqttClient]  # (settings, client_id, *, will) -> client


class AgentLink:
    """One agent's connection to the coordinator (see the module docstring)."""

    def __init__(
        self,
        settings: MqttSettings,
        fleet: str,
        identity: AgentIdentity,
        *,
        policy: LinkPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        telemetry: Callable[[], Telemetry] | None = None,
        client_factory: ClientFactory = MqttClient,
        codec_state: CodecState | None = None,
    ) -> None:
        """``client_factory(settings, client_id, will=...)`` makes the MQTT client (default
        :class:`MqttClient`, threads of its own; a host serving many agents from one event
        loop passes a client of the same interface). ``codec_state``: where the agent
        keeps its error-feedback residual and the global models it received (default: in
        memory, lost at exit)."""
        check_ident(identity.agent_id, "agent id")
        self.identity = identity
        self.telemetry = telemetry  # what the registration reports, built at each connect
        self.policy = p = policy or LinkPolicy()
        self.topics = Topics(fleet)
        self.clock = clock
        self.wall_clock = wall_clock
        me = identity.agent_id
        self.releases: Deployment | None = None  # set by serve_releases
        self._status_schedule: StatusSchedule | None = None
        self.codec_state = codec_state if codec_state is not None else CodecState()
        # before the will: its run
        self.intake = TaskIntake(me, p.intake(), clock=clock, held=self.codec_state)
        self.client = client_factory(settings, me, will=self._will)
        self.reader = InboundReader(me, identity.secret, identity.prototype)
        self.outbox = UpdateOutbox(
            self.client,
            self.topics,
            me,
            secret=identity.secret,
            retry=p.update_retry,
            max_sent_blobs=p.max_sent_blobs,
            resend=p.resend,
            clock=clock,
            wall_clock=wall_clock,
        )
        self._ready: queue.Queue[ReceivedTask] = queue.Queue(maxsize=p.max_tasks)
        self._cond = threading.Condition()
        self._global: GlobalAnnouncement | None = None  # latest of this agent's prototype
        self.registrations = RegistrationBook()
        self.runs = RunFilter(me)
        # a secure round's messages from the coordinator (takfl.wire.secure)
        self.secure_inbox = SecureInbox()
        routes = {
            Down.TASK: self._on_task,
            Down.CHUNK: self._on_chunk,
            Down.REQUEST: self._on_request,
            Down.ACK: self._on_ack,
            Down.GLOBAL: self._on_global,
            Down.SECAGG_ROSTER: self._secure_handler(SecAggRoster, "secure roster"),
            Down.SECAGG_SHARES: self._secure_handler(SecAggDelivery, "secure shares"),
            Down.SECAGG_UNMASK: self._secure_handler(SecAggUnmask, "unmasking request"),
        }
        for kind, handler in routes.items():
            self.client.route(self.topics.down(me, kind), handler)
        self.client.route(self.topics.coordinator_status(), self._on_coordinator)
        self.client.on_connected(self._announce)
        self.client.every_tick(self._tick)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float | None = 10.0) -> AgentLink:
        self.client.start(timeout)
        return self

    def close(self) -> None:
        if self.releases is not None:
            self.releases.channel.wait_idle(30.0)  # let an install finish and report
        self.client.stop(final=(self._status_topic(), self._status("offline")))

    def __enter__(self) -> AgentLink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- public API -----------------------------------------------------------------------
    def registration(self) -> Registration:
        telemetry = self.telemetry() if self.telemetry is not None else None
        return self.identity.registration(self.wall_clock(), telemetry, run=self.intake.run)

    @property
    def run(self) -> str:
        """The coordinator's run this agent follows ("" before its first task)."""
        return self.intake.run

    def next_task(self, timeout: float) -> ReceivedTask | None:
        """The next task whose global model has fully arrived, or None after ``timeout`` s."""
        try:
            return self._ready.get(timeout=timeout)
        except queue.Empty:
            return None

    def send_update(
        self,
        task: ReceivedTask,
        trained: Mapping[str, torch.Tensor],
        *,
        num_samples: int,
        metrics: Mapping[str, float] | None = None,
        compression: str | None = None,
        telemetry: Telemetry | None = None,
    ) -> UpdateHeader:
        """Encode ``trained - global`` as the task asks (adding the error-feedback residual
        the codec keeps, and keeping the new one), sign, and send header and chunks."""
        msg = task.message
        prepared = prepare_update(
            task.message,
            trained,
            task.global_state,
            secret=self.identity.secret,
            num_samples=num_samples,
            metrics=metrics,
            compression=compression,
            telemetry=telemetry,
            residual=self.codec_state.residual(msg.run, msg.prototype),
        )
        self.codec_state.keep_residual(msg.run, msg.prototype, prepared.residual)
        return self.send_prepared(prepared, deadline=msg.deadline)

    def send_prepared(
        self,
        prepared: PreparedUpdate,
        *,
        deadline: float,
        chunk_indices: Iterable[int] | None = None,
    ) -> UpdateHeader:
        """Send a prepared update: keep the blob, publish the header (stamped now), then the
        chunks (all, or only ``chunk_indices``; the rest can be requested). Returns the
        header as sent."""
        return self.outbox.send(prepared, deadline, chunk_indices)

    def secure_send(self) -> SecureSend:
        """How a secure round (:func:`edge_agent.secure_round.run_secure_round`) sends:
        control messages signed with this agent's secret, the masked input as an update."""
        me, secret = self.identity.agent_id, self.identity.secret

        def publish(leaf: Up, message: SignedMessage) -> None:
            self.client.publish(self.topics.up(me, leaf), encode_message(sign(message, secret)))

        def send_update(prepared: PreparedUpdate, deadline: float) -> UpdateHeader:
            return self.send_prepared(prepared, deadline=deadline)

        return SecureSend(publish=publish, send_update=send_update, secret=secret)

    def has_task(self) -> bool:
        """Whether a task is waiting (a secure round still in progress gives way to it)."""
        return not self._ready.empty()

    def traffic(self) -> tuple[int, int, int]:
        """(payload bytes sent, bytes received, retries: headers announced again plus
        reconnects) since the link started."""
        c = self.client.counters
        return c.bytes_sent, c.bytes_received, self.outbox.header_retries + max(0, c.connects - 1)

    def wait_global(self, min_round: int, timeout: float) -> GlobalAnnouncement | None:
        """The latest announcement of this prototype's global model once its round is at
        least ``min_round``, or None after ``timeout`` s."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._global is not None and self._global.round_id >= min_round, timeout
            )
            g = self._global
        return g if g is not None and g.round_id >= min_round else None

    def wait_ack(self, key: str, timeout: float) -> Ack | None:
        """The coordinator's ack of an update (key: blob digest) or of the registration
        (key: ``REGISTER_KEY``), or None after ``timeout`` s."""
        return self.outbox.wait_ack(key, timeout)

    def serve_releases(self, deployment: Deployment, *, status_every_s: float = 30.0) -> None:
        """Also install the releases of this agent's prototype over this connection (one
        MQTT session per agent: the broker knows it by its agent id): route
        ``down/<me>/release`` to the deployment's channel, offer it every chunk first, tick
        it, and carry its inference block on the status. Call before :meth:`start`."""
        from edge_agent.serving.stats import StatusSchedule

        channel = deployment.channel
        self.releases = deployment
        self._status_schedule = StatusSchedule(status_every_s, clock=self.clock)
        self.client.route(channel.offer_topic, channel.on_offer)

    # -- inspection -------------------------------------------------------------------------
    @property
    def counters(self) -> LinkCounters:
        """The counters of the link's units, as they are now."""
        c = self.intake.counters
        return LinkCounters(
            tasks=c.tasks,
            bad_tasks=c.bad_tasks,
            blob_errors=c.blob_errors,
            ignored_chunks=c.ignored_chunks,
            requests_answered=self.outbox.requests_answered,
            header_retries=self.outbox.header_retries,
            unauthenticated=self.reader.unauthenticated,
            stale=self.reader.stale,
            other_run=self.runs.ignored,
        )

    @property
    def sender(self) -> BlobSender:
        """The outbox's sender (its store of update blobs and what it sent again)."""
        return self.outbox.sender

    @property
    def programs(self) -> ProgramCache:
        """Training programs held, by digest (the intake's)."""
        return self.intake.programs

    # -- publishing -------------------------------------------------------------------------
    def _status_topic(self) -> str:
        return self.topics.up(self.identity.agent_id, Up.STATUS)

    def _status(self, state: Literal["online", "offline"], at: float | None = None) -> bytes:
        """A signed status of the connection that started at ``at`` (a will, made then),
        or of the current connection (made now)."""
        when = self.client.connection_time if at is None else at
        inference = self.releases.inference_status() if self.releases is not None else None
        return self.identity.status(state, when, inference, run=self.intake.run, sent_at=at)

    def _will(self, connection_time: float) -> Will:
        return Will(self._status_topic(), self._status("offline", connection_time))

    def _announce(self) -> None:
        """Online (retained) on every connect; the registration follows the coordinator's
        status (:meth:`_on_coordinator`), which arrives with the subscription."""
        self.registrations.connected()
        self.client.publish(self._status_topic(), self._status("online"), retain=True)
        if self.releases is not None and self._status_schedule is not None:
            self._status_schedule.sent(self.releases.inference_status())

    def _register(self) -> None:
        registration = self.registration()
        self.registrations.sent(registration)
        topic = self.topics.up(self.identity.agent_id, Up.REGISTER)
        self.client.publish(topic, encode_message(registration))

    def _on_coordinator(self, _topic: str, payload: bytes) -> None:
        """The coordinator's presence: register when it came online on a connection this
        link has not registered with (unsigned, like every monitor's view of it: at worst
        a forged one makes the agent register once more)."""
        presence = coordinator_presence(payload)
        if presence is not None and self.registrations.coordinator(*presence):
            self._register()

    def _request(self, missing: Missing) -> None:
        """Ask the coordinator for the chunks it has not delivered yet."""
        me = self.identity.agent_id
        request = ChunkRequest(
            run=self.intake.run, agent_id=me, digest=missing.digest, missing=missing.indices
        )
        signed = sign(request, self.identity.secret)
        self.client.publish(self.topics.up(me, Up.REQUEST), encode_message(signed))

    def _decided(self, decision: Decision) -> None:
        """Publish what the intake decided and hand on the tasks it released."""
        me = self.identity.agent_id
        for ack in decision.acks:
            signed = sign(ack, self.identity.secret)
            self.client.publish(self.topics.up(me, Up.ACK), encode_message(signed))
        if decision.repeated is not None:
            self.outbox.answer_again(decision.repeated)
        for missing in decision.requests:
            self._request(missing)
        for received in decision.ready:
            try:
                self._ready.put_nowait(received)
            except queue.Full:
                log.warning("%s: task queue full; dropped round %d", me, received.message.round_id)

    # -- handlers (dispatcher thread) -------------------------------------------------------
    def _on_task(self, _topic: str, payload: bytes) -> None:
        self._decided(self.intake.task(self.reader.task(payload)))

    def _on_chunk(self, _topic: str, payload: bytes) -> None:
        if self.releases is not None and self._release_chunk(payload):
            return
        self._decided(self.intake.chunk(payload))

    def _release_chunk(self, payload: bytes) -> bool:
        """True if the chunk belonged to a release artifact being fetched (and was taken);
        anything else, malformed chunks included, is the task intake's to judge."""
        try:
            chunk = decode_chunk(payload)
        except WireError:
            return False
        return self.releases is not None and self.releases.channel.on_chunk(chunk)

    def _on_request(self, _topic: str, payload: bytes) -> None:
        request = self.reader.control(ChunkRequest, payload, "chunk request")
        if request is None:
            return
        if self.runs.accepts("chunk request", request.run, self.outbox.run_of(request.digest)):
            self.outbox.answer(request, COORDINATOR)

    def _secure_handler(
        self, cls: type[SecAggRoster] | type[SecAggDelivery] | type[SecAggUnmask], what: str
    ) -> Callable[[str, bytes], None]:
        def handle(_topic: str, payload: bytes) -> None:
            msg = self.reader.control(cls, payload, what)
            if msg is not None and self.runs.accepts(what, msg.run, self.intake.run or None):
                self.secure_inbox.put(msg)

        return handle

    def _on_global(self, _topic: str, payload: bytes) -> None:
        # retained, so possibly older than the replay window: ordered by round instead
        ann = self.reader.control(GlobalAnnouncement, payload, "global announcement", fresh=False)
        if ann is None or ann.prototype != self.identity.prototype:
            return
        if not self.runs.accepts("global announcement", ann.run, self.intake.run or None):
            return
        with self._cond:
            if self._global is None or ann.round_id >= self._global.round_id:
                self._global = ann
            self._cond.notify_all()

    def _on_ack(self, _topic: str, payload: bytes) -> None:
        ack = self.reader.control(Ack, payload, "ack", lambda a: f"{a.subject} ack")
        if ack is None:
            return
        me = self.identity.agent_id
        if ack.subject == "register" and not self.registrations.answers(ack):
            log.info("%s: ignored an ack of another registration", me)
            return
        key = REGISTER_KEY if ack.subject == "register" else ack.digest
        if key is None:
            return
        if ack.subject == "update" and not self.runs.accepts(
            "update ack", ack.run, self.outbox.run_of(key)
        ):
            return
        if not ack.accepted:
            log.warning(
                "%s: coordinator refused %s: %s %s", me, ack.subject, ack.reason, ack.detail
            )
        self.outbox.acknowledged(key, ack)

    def _tick(self) -> None:
        for missing in self.intake.tick():
            self._request(missing)
        self.outbox.retry_due()
        if self.releases is not None:
            self._tick_releases(self.releases)

    def _tick_releases(self, deployment: Deployment) -> None:
        """Drive the release channel; publish the status again when the inference block
        changed (at most every ``status_every_s``)."""
        deployment.channel.tick()
        block = deployment.inference_status()
        schedule = self._status_schedule
        if schedule is not None and self.client.is_connected and schedule.due(block):
            self.client.publish(self._status_topic(), self._status("online"), retain=True)
            schedule.sent(block)
