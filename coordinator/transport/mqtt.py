"""MQTT transport: the coordinator's end of the wire protocol (``takfl.wire``).

Thin glue between the broker and three broker-free units: :class:`Presence`
(registrations and online status), :class:`TaskDispatch` (signed tasks, their acks and
re-sends) and :class:`UpdateIntake` (update headers and chunks in, verdicts out). Each
handler reads the message once (:func:`coordinator.transport.inbound.read`), hands it
to its unit and publishes the answer. Per round it signs a task for every selected agent
and sends it with the prototype's global model (fp32 safetensors, chunked).

Every message belongs to the transport's run (``run_id``): tasks, acks, requests and
announcements carry it, and what an agent sends for another run is recognised
(``other_run``) and never acted on. Control messages are checked for freshness (one
:class:`ReplayGuard` per transport); every publish of a signed message is stamped anew.
When the run ends (:meth:`MqttTransport.finish`) updates still arriving are answered
``run_finished``.

Threads: the engine calls the Transport methods; paho's network thread only
queues messages; one dispatcher thread runs every handler and periodic check.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Literal, TypeVar

from coordinator.observe import FleetObserver
from coordinator.transport.base import ClientUpdate, SecureSum, Task, Transport
from coordinator.transport.control import ControlDesk
from coordinator.transport.dispatch import TaskDispatch, task_message
from coordinator.transport.downlinks import Downlinks
from coordinator.transport.inbound import agent_of as read_agent
from coordinator.transport.inbound import read
from coordinator.transport.intake import (
    Decision,
    IntakeCounters,
    IntakePolicy,
    UpdateIntake,
    refused_answer,
)
from coordinator.transport.presence import AgentState, Presence, PresenceGate
from coordinator.transport.secure_rounds import Outgoing, SecureRounds
from takfl.config.privacy import PrivacySpec
from takfl.config.profile import CommsSpec
from takfl.mqtt.blobs import BlobReceiver, BlobSender, BlobStore
from takfl.mqtt.client import MqttClient, MqttSettings, Will
from takfl.mqtt.ratelimit import MessageLimits, ResendLimiter, ResendLimits, with_room_for
from takfl.mqtt.retry import RetryPolicy
from takfl.privacy.modes import privacy_mode
from takfl.secagg.vector import vector_length
from takfl.state import State
from takfl.wire.bounds import StateBounds
from takfl.wire.chunking import ReassemblyLimits, blob_ref
from takfl.wire.codec import encode_state
from takfl.wire.codecs import resolve_codec
from takfl.wire.downlink import FULL_ENCODING, Downlink
from takfl.wire.envelope import new_run_id
from takfl.wire.freshness import FreshnessPolicy, ReplayGuard
from takfl.wire.messages import (
    Ack,
    BlobRef,
    ChunkRequest,
    GlobalAnnouncement,
    InputNorm,
    Registration,
    SecAggTask,
    SignedMessage,
    Status,
    TaskMessage,
    UpdateHeader,
    encode_message,
)
from takfl.wire.secure import SecAggKeys, SecAggReveal, SecAggShares
from takfl.wire.signing import restamp, sign
from takfl.wire.topics import Down, Topics, Up
from takfl.wire.validation import AgentRecord, Refusal, UpdateBounds, Verdict

log = logging.getLogger(__name__)
S = TypeVar("S", bound=SignedMessage)

COORDINATOR_ID = "coordinator"  # agent_id of the coordinator's own Status
GLOBAL_ENCODING = FULL_ENCODING  # a full global model travels uncompressed
# an agent refusing a delta task for these gets the full model (takfl.wire.downlink)
FULL_MODEL_REASONS = frozenset(
    {Refusal.WRONG_BASE.value, Refusal.DIGEST_MISMATCH.value, Refusal.MALFORMED.value}
)
KEY_MARGIN = 1024  # rate-limit buckets kept beyond one per provisioned agent
OUTBOX_PER_AGENT = 8  # outbox room per provisioned agent beyond a round's tasks and models


@dataclass(frozen=True, kw_only=True)
class TransportPolicy:
    comms: CommsSpec = field(default_factory=CommsSpec)  # update encoding asked of agents
    comms_by_prototype: Mapping[str, CommsSpec] = field(default_factory=dict)  # overrides
    global_chunk_size: int = 128 * 1024  # chunk size of the global model blobs
    bounds: UpdateBounds = field(default_factory=UpdateBounds)
    limits: ReassemblyLimits = field(  # per agent
        default_factory=lambda: ReassemblyLimits(max_pending=2, timeout_s=600.0)
    )
    max_total_bytes: int = 4 * 1024**3  # reassembly buffers across all agents
    max_chunk_bytes: int = 16 * 1024 * 1024  # payload of one received chunk
    quiet_s: float = 5.0  # ask again for missing update chunks after this long
    # send a task again when the agent has not acknowledged it: after 15 s, 30 s, 60 s, 120 s ...
    task_retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_sent_blobs: int = 16  # global blobs kept to answer chunk requests
    max_sent_bytes: int = 4 * 1024**3
    # ExecuTorch training programs by prototype, offered with every task of that prototype
    # (agents that train through ExecuTorch fetch one by chunk request when not cached).
    programs: Mapping[str, bytes] = field(default_factory=dict)
    resend: ResendLimits = field(default_factory=ResendLimits)  # answers to chunk requests
    freshness: FreshnessPolicy = field(default_factory=FreshnessPolicy)  # replay window
    # after the last round: how long late updates are still answered ("run_finished")
    # while some agent of that round has not delivered (agents re-announce every 15 s)
    finish_grace_s: float = 20.0
    # per agent, before a message is queued: an agent registers and says online once per
    # connection (and the broker sends its will), so these leave room for a few
    # reconnects a minute; the excess is dropped unread, counted, logged once a window
    registrations: MessageLimits = field(default_factory=lambda: MessageLimits(per_window=10))
    statuses: MessageLimits = field(default_factory=lambda: MessageLimits(per_window=20))
    # the run's privacy section: under secagg every prototype's round is a secure round
    privacy: PrivacySpec | None = None

    @property
    def secure(self) -> bool:
        return self.privacy is not None and privacy_mode(self.privacy.mode).secure_sum

    def intake(self) -> IntakePolicy:
        return IntakePolicy(
            bounds=self.bounds,
            limits=self.limits,
            max_total_bytes=self.max_total_bytes,
            max_chunk_bytes=self.max_chunk_bytes,
            quiet_s=self.quiet_s,
        )


@dataclass(kw_only=True)
class TransportCounters:
    registrations: int = 0
    chunks_resent: int = 0
    task_retries: int = 0
    registrations_dropped: int = 0  # over an agent's rate limit, dropped unread
    statuses_dropped: int = 0
    full_resends: int = 0  # full global models sent after an agent refused a delta


class MqttTransport(Transport):
    """The coordinator's MQTT transport. ``start()`` before use; ``close()`` after."""

    def __init__(
        self,
        settings: MqttSettings,
        fleet: str,
        registry: Mapping[str, AgentRecord],
        *,
        num_classes: int,
        input_shape: tuple[int, int, int],
        policy: TransportPolicy | None = None,
        client_id: str = "takfl-coordinator",
        clock: Callable[[], float] = time.monotonic,
        on_allowance: Callable[[str, int], None] | None = None,
        observer: FleetObserver | None = None,
        run_id: str | None = None,
        input_norm: InputNorm | None = None,
    ) -> None:
        """``on_allowance(agent, n)`` is called when an agent's first accepted registration
        pins its sample allowance (to persist it); ``observer`` hears of registrations,
        presence, tasks, accepted and refused updates (telemetry log, metrics).
        ``run_id``: the run every message belongs to (None: a fresh one);
        ``input_norm``: the data's standardisation, told to the agents in every task."""
        self.observer = observer or FleetObserver()
        self.topics = Topics(fleet)
        self.registry = dict(registry)
        self.num_classes = num_classes
        self.input_shape = input_shape
        self.input_norm = input_norm
        self.run_id = run_id if run_id is not None else new_run_id()
        self.policy = policy or TransportPolicy()
        p = self.policy
        self.guard = ReplayGuard(p.freshness)
        self.presence = Presence(self.registry, on_allowance=on_allowance, guard=self.guard)
        self.dispatch = TaskDispatch(
            self.registry, retry=p.task_retry, clock=clock, run=self.run_id
        )
        # secure rounds (privacy mode secagg): masked inputs go to them, never decoded
        self.secure: SecureRounds | None = None
        if p.secure and p.privacy is not None:
            self.secure = SecureRounds(p.privacy, self.run_id, clock=clock)
        self.intake = UpdateIntake(
            self.registry,
            self.dispatch,
            p.intake(),
            clock=clock,
            guard=self.guard,
            secure_input=self._secure_input if self.secure is not None else None,
        )
        self.desk = ControlDesk(self.dispatch)  # task acks and chunk requests
        # downstream: full models, or deltas where a prototype's profile names a codec
        self.downlinks = Downlinks(
            {
                name: resolve_codec(c.downstream)
                for name, c in p.comms_by_prototype.items()
                if c.downstream is not None
            },
            default=None if p.comms.downstream is None else resolve_codec(p.comms.downstream),
        )
        self._globals: dict[tuple[int, str], Task] = {}  # (round, prototype) -> a task of it
        self._counters = TransportCounters()
        offline = self._coordinator_status("offline", 0.0)
        self.client = MqttClient(
            settings,
            client_id,
            will=Will(self.topics.coordinator_status(), encode_message(offline)),
        )
        self._base_outbox = settings.outbox_size  # the outbox beyond a round's burst
        # per-agent buckets for every provisioned agent (and a margin for unknown senders);
        # a chunk request's limits keep three buckets per agent
        agents = len(self.registry) + KEY_MARGIN
        self.sender = BlobSender(
            self.client,
            BlobStore(p.max_sent_blobs, p.max_sent_bytes),
            ResendLimiter(with_room_for(p.resend, 3 * agents), clock=clock),
        )
        self._updates: queue.Queue[ClientUpdate | SecureSum] = queue.Queue()
        self._refused: queue.Queue[tuple[int, str]] = queue.Queue()  # final refusals
        self.gate = PresenceGate(
            self.topics,
            with_room_for(p.registrations, agents),
            with_room_for(p.statuses, agents),
            clock=clock,
        )
        t = self.topics
        self.client.route(t.up_filter(Up.REGISTER), self._on_register, admit=self.gate.registration)
        self.client.route(t.up_filter(Up.STATUS), self._on_status, admit=self.gate.status)
        self.client.route(t.up_filter(Up.ACK), self._on_task_ack)
        self.client.route(t.up_filter(Up.REQUEST), self._on_request)
        self.client.route(t.up_filter(Up.UPDATE), self._on_update)
        self.client.route(t.up_filter(Up.CHUNK), self._on_chunk)
        if self.secure is not None:
            rounds = self.secure
            for leaf, handler in (
                (Up.SECAGG_KEYS, self._secure_handler(SecAggKeys, rounds.keys)),
                (Up.SECAGG_SHARES, self._secure_handler(SecAggShares, rounds.shares)),
                (Up.SECAGG_REVEAL, self._secure_handler(SecAggReveal, rounds.reveal)),
            ):
                self.client.route(t.up_filter(leaf), handler)
        self.client.on_connected(self._announce)
        self.client.every_tick(self._tick)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float | None = 10.0) -> MqttTransport:
        self.client.start(timeout)
        return self

    def close(self) -> None:
        offline = self._coordinator_status("offline", time.time())
        self.client.stop(final=(self.topics.coordinator_status(), encode_message(offline)))

    def _coordinator_status(self, state: Literal["online", "offline"], at: float) -> Status:
        """The coordinator's presence (unsigned, for monitors and agents' re-registration)."""
        return Status(agent_id=COORDINATOR_ID, state=state, time=at, run=self.run_id)

    def __enter__(self) -> MqttTransport:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- Transport -----------------------------------------------------------------------------
    def clients(self) -> dict[str, list[str]]:
        """Registered agents that are online, by prototype."""
        return self.presence.clients()

    def wait_for_agents(self, agents: list[str], timeout: float) -> bool:
        """Wait until every agent in ``agents`` is registered and online."""
        return self.presence.wait_for(agents, timeout)

    def send_tasks(self, tasks: list[Task]) -> None:
        """Sign and publish each task, then its global model's chunks: the full model, or
        a delta against the model the agent holds where its prototype's profile names a
        downstream codec (agents holding the same model share one blob)."""
        if not tasks:
            return
        self.dispatch.check(tasks)
        secure = self._open_secure_rounds(tasks)
        refs: dict[tuple[int, str, str | None], BlobRef] = {}
        sent: list[tuple[Task, Downlink]] = []
        for t in tasks:
            plan = self.downlinks.plan(t.round_id, t.prototype, t.client_id, t.global_state)
            key = (t.round_id, t.prototype, plan.base)
            if key not in refs:
                refs[key] = self.sender.keep(plan.blob, self.policy.global_chunk_size)
            sent.append((replace(t, global_state=plan.state), plan))
            self._globals[(t.round_id, t.prototype)] = t
        newest = max(t.round_id for t in tasks)
        self._globals = {k: v for k, v in self._globals.items() if k[0] >= newest}
        programs = {
            name: self.sender.keep(program, self.policy.global_chunk_size)
            for name, program in self.policy.programs.items()
            if any(t.prototype == name for t in tasks)
        }
        pairs = [
            (
                t,
                self._task_message(
                    t,
                    refs[(t.round_id, t.prototype, plan.base)],
                    plan,
                    programs,
                    secure.get(t.client_id),
                ),
            )
            for t, plan in sent
        ]
        counts = Counter((t.round_id, t.prototype, p.base) for t, p in sent)
        for (round_id, proto, base), ref in refs.items():
            self.observer.tasks_sent(round_id, proto, counts[(round_id, proto, base)], ref.size)
        if self.dispatch.assign(pairs):
            self.intake.new_round(self.dispatch.round)
        # the whole burst waits in the outbox (a refused publish would cost the agent a
        # task re-send): every task and its model's chunks, and room for what every agent
        # may be sent while they go out (its acks, again for a header it re-announces while
        # the coordinator is behind, its signed announcement, answers to chunk requests)
        self.client.reserve_outbox(
            self._base_outbox
            + sum(1 + m.blob.count for _, m in pairs)
            + OUTBOX_PER_AGENT * len(self.registry)
        )
        for t, msg in pairs:
            self.client.publish(self.topics.down(t.client_id, Down.TASK), encode_message(msg))
            self.sender.publish(self.topics.down(t.client_id, Down.CHUNK), msg.blob.digest)

    def _open_secure_rounds(self, tasks: list[Task]) -> dict[str, SecAggTask]:
        """Under secagg: open a secure round per prototype among its tasks' agents;
        each agent's ``task.secagg`` by agent id (empty in other modes)."""
        if self.secure is None:
            return {}
        groups: dict[tuple[int, str], list[Task]] = {}
        for t in tasks:
            groups.setdefault((t.round_id, t.prototype), []).append(t)
        out: dict[str, SecAggTask] = {}
        for (round_id, proto), group in sorted(groups.items()):
            first = group[0]
            out |= self.secure.open(
                round_id,
                proto,
                [t.client_id for t in group],
                vector_length(first.global_state),
                max(0.0, first.deadline - time.time()),
                first.noise_multiplier,
            )
        return out

    def _task_message(
        self,
        t: Task,
        ref: BlobRef,
        plan: Downlink,
        programs: Mapping[str, BlobRef],
        secagg: SecAggTask | None = None,
    ) -> TaskMessage:
        return task_message(
            t,
            ref,
            self.registry[t.client_id].secret,
            comms=self.policy.comms_by_prototype.get(t.prototype, self.policy.comms),
            num_classes=self.num_classes,
            input_shape=self.input_shape,
            program=programs.get(t.prototype),
            run=self.run_id,
            input_norm=self.input_norm,
            base=plan.base,
            model_digest=plan.digest,
            secagg=secagg,
        )

    def _send_full(self, agent: str, ack: Ack) -> None:
        """``agent`` refused a delta (it does not hold the base, or the model it rebuilt
        is not the signed one): send it the full model instead."""
        a = self.dispatch.assignment(agent)
        if a is None or a.message.base is None or ack.digest != a.message.blob.digest:
            return
        task = self._globals.get((a.message.round_id, a.message.prototype))
        if task is None:
            return
        self.downlinks.forget(agent)
        plan = self.downlinks.plan(task.round_id, task.prototype, agent, task.global_state)
        ref = self.sender.keep(plan.blob, self.policy.global_chunk_size)
        mine = replace(task, client_id=agent, global_state=plan.state, seed=a.message.seed)
        program = a.message.program
        msg = self._task_message(
            mine, ref, plan, {} if program is None else {task.prototype: program}, a.message.secagg
        )
        if not self.dispatch.reassign(agent, msg, plan.state):
            return
        log.info("%s refused a delta (%s): sending the full model", agent, ack.reason)
        self._counters.full_resends += 1
        self.observer.tasks_sent(task.round_id, task.prototype, 1, ref.size)
        self.client.publish(self.topics.down(agent, Down.TASK), encode_message(msg))
        self.sender.publish(self.topics.down(agent, Down.CHUNK), msg.blob.digest)

    def next_update(self, timeout: float) -> ClientUpdate | SecureSum | None:
        try:
            return self._updates.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def refused_answers(self) -> list[tuple[int, str]]:
        out = []
        while True:
            try:
                out.append(self._refused.get_nowait())
            except queue.Empty:
                return out

    def publish_global(self, round_id: int, prototype: str, state: State) -> None:
        """Announce (retained) the digest and size of a prototype's new global model: to
        monitors on the broadcast topic, and signed to each of the prototype's agents."""
        ref = blob_ref(encode_state(state, GLOBAL_ENCODING), self.policy.global_chunk_size)
        ann = GlobalAnnouncement(
            run=self.run_id,
            round_id=round_id,
            prototype=prototype,
            digest=ref.digest,
            size=ref.size,
        )
        self.client.publish(self.topics.global_model(prototype), encode_message(ann), retain=True)
        for agent, record in sorted(self.registry.items()):
            if record.prototype == prototype:
                signed = sign(ann.model_copy(update={"agent_id": agent}), record.secret)
                topic = self.topics.down(agent, Down.GLOBAL)
                self.client.publish(topic, encode_message(signed), retain=True)

    def clear_globals(self, prototypes: Iterable[str]) -> None:
        """A new run starts: clear (empty retained payload) the announcements of the
        previous run's global models, on the broadcast topics of ``prototypes`` and on
        every provisioned agent's ``down/global``."""
        for prototype in prototypes:
            self.client.publish(self.topics.global_model(prototype), b"", retain=True)
        for agent in sorted(self.registry):
            self.client.publish(self.topics.down(agent, Down.GLOBAL), b"", retain=True)

    def finish(self, grace_s: float | None = None) -> None:
        """The run has ended: from now on every update is answered ``run_finished``.
        Waits (at most ``grace_s``, default the policy's) while an agent of the last
        round has neither delivered nor passed its task's deadline, so an update still on
        its way gets its answer before the coordinator leaves."""
        self.dispatch.finish()
        end = time.monotonic() + (self.policy.finish_grace_s if grace_s is None else grace_s)
        while time.monotonic() < end and self.dispatch.awaited(self.intake.delivered):
            time.sleep(0.2)

    def bound_updates(self, bounds: Mapping[str, StateBounds]) -> None:
        """Per-tensor, buffer and whole-norm bounds by prototype, checked on receipt."""
        self.intake.state_bounds = dict(bounds)

    def refused(self, update: ClientUpdate, verdict: Verdict) -> None:
        """The engine refused an update the intake had accepted: counted with the
        intake's refusals and told to the observer (metrics, telemetry log)."""
        reason = (verdict.reason or Refusal.MALFORMED).value
        self.counters.refused[reason] += 1
        self.observer.refused(update.client_id, update.prototype, update.round_id, reason)

    @property
    def on_allowance(self) -> Callable[[str, int], None] | None:
        """Called with (agent, n) when a first registration pins an allowance."""
        return self.presence.on_allowance

    @on_allowance.setter
    def on_allowance(self, hook: Callable[[str, int], None] | None) -> None:
        self.presence.on_allowance = hook

    # -- inspection --------------------------------------------------------------------------------
    @property
    def counters(self) -> IntakeCounters:
        """Counters of the update intake (accepted, refused by reason, chunks)."""
        return self.intake.counters

    @property
    def transport_counters(self) -> TransportCounters:
        self._counters.registrations = self.presence.registrations
        self._counters.registrations_dropped = self.gate.registrations.total_dropped
        self._counters.statuses_dropped = self.gate.statuses.total_dropped
        return self._counters

    @property
    def receiver(self) -> BlobReceiver:
        return self.intake.receiver

    def agents(self) -> dict[str, AgentState]:
        return self.presence.snapshot()

    def pending_transfers(self) -> int:
        """Update blobs announced and not yet complete."""
        return self.intake.pending()

    # -- publishing ------------------------------------------------------------
    def _announce(self) -> None:
        """Online (retained) on every connect: agents register again when they see it."""
        online = self._coordinator_status("online", time.time())
        self.client.publish(self.topics.coordinator_status(), encode_message(online), retain=True)

    def _signed(self, agent: str, message: S) -> S:
        """``message`` stamped now and signed with the agent's secret (unsigned for an
        unknown agent, which cannot verify it anyway)."""
        record = self.registry.get(agent)
        return message if record is None else restamp(message, record.secret)

    def _ack(self, agent: str, ack: Ack) -> None:
        self.client.publish(
            self.topics.down(agent, Down.ACK), encode_message(self._signed(agent, ack))
        )

    def _decided(self, decision: Decision) -> None:
        if decision.update is not None:
            self._updates.put(decision.update)
            if decision.header is not None:
                self.observer.accepted(decision.header)
                # the agent trained on this model, so it holds it: the next goes as a delta
                self.downlinks.holds(decision.update.client_id, decision.header.base_digest)
        elif not decision.verdict.accepted and decision.agent is not None:
            record = self.registry.get(decision.agent)
            self.observer.refused(
                decision.agent,
                record.prototype if record else None,
                decision.ack.round_id if decision.ack is not None else None,
                (decision.verdict.reason or Refusal.MALFORMED).value,
            )
            answer = refused_answer(decision)
            if answer is not None:
                self._refused.put(answer)
        if decision.agent is not None and decision.ack is not None:
            self._ack(decision.agent, decision.ack)

    # -- handlers (dispatcher thread) -------------------------------------------------------------
    def _on_register(self, topic: str, payload: bytes) -> None:
        received = read(
            Registration, self.topics, topic, payload, self.registry, authenticate=False
        )
        verdict, ack = self.presence.register(received)
        if not verdict.accepted:
            self.counters.refused[(verdict.reason or Refusal.MALFORMED).value] += 1
            log.warning("refused registration on %s: %s", topic, verdict)
            # registrations are never retained in 1.0; a retained one (an old agent's) is
            # cleared so that it is not delivered again to every coordinator
            self.client.publish(topic, b"", retain=True)
            if received.agent is not None:
                record = self.registry.get(received.agent)
                self.observer.refused(
                    received.agent,
                    record.prototype if record else None,
                    None,
                    (verdict.reason or Refusal.MALFORMED).value,
                )
        elif received.agent is not None and received.message is not None:
            msg = received.message
            self.observer.registered(received.agent, msg.prototype, msg.telemetry)
        if ack is not None and received.agent is not None:
            self._ack(received.agent, ack)

    def _on_status(self, topic: str, payload: bytes) -> None:
        received = read(Status, self.topics, topic, payload, self.registry)
        if received.verdict.reason is Refusal.UNKNOWN_AGENT:
            self.client.publish(topic, b"", retain=True)  # no longer provisioned: cleared
        if self.presence.status(received) and received.agent is not None:
            msg = received.message
            online = msg is not None and msg.state == "online"
            self.observer.presence(received.agent, self.registry[received.agent].prototype, online)

    def _on_task_ack(self, topic: str, payload: bytes) -> None:
        received = read(Ack, self.topics, topic, payload, self.registry, guard=self.guard)
        self.desk.task_ack(received)
        ack = received.message
        refused = ack is not None and not ack.accepted and ack.reason in FULL_MODEL_REASONS
        if received.ok and refused and ack is not None and received.agent is not None:
            self._send_full(received.agent, ack)

    def _on_request(self, topic: str, payload: bytes) -> None:
        received = read(ChunkRequest, self.topics, topic, payload, self.registry, guard=self.guard)
        request = self.desk.chunk_request(received)
        if request is not None and received.agent is not None:
            topic = self.topics.down(received.agent, Down.CHUNK)
            self._counters.chunks_resent += self.sender.answer(topic, request, received.agent)

    def _on_update(self, topic: str, payload: bytes) -> None:
        received = read(
            UpdateHeader, self.topics, topic, payload, self.registry, authenticate=False
        )
        self._decided(self.intake.header(received))

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        agent = read_agent(self.topics, topic)
        self._decided(self.intake.chunk(agent, payload))

    # -- secure rounds (dispatcher thread) -------------------------------------------------
    def _secure_input(self, agent: str, header: UpdateHeader, blob: bytes) -> Verdict:
        """The intake's hand-off of a masked input (the blob is dropped after this)."""
        assert self.secure is not None
        verdict, out = self.secure.masked_input(agent, header.round_id, header.prototype, blob)
        self._secure_out(out)
        return verdict

    def _secure_handler(
        self, cls: type[S], step: Callable[[str, S], list[Outgoing]]
    ) -> Callable[[str, bytes], None]:
        """A route handler for one kind of secure-round message: read (signed by the
        topic's agent, fresh), of this run, then ``step`` and publish what it says."""

        def handle(topic: str, payload: bytes) -> None:
            received = read(cls, self.topics, topic, payload, self.registry, guard=self.guard)
            msg, agent = received.message, received.agent
            if received.ok and msg is not None and agent is not None and self._of_this_run(msg):
                self._secure_out(step(agent, msg))

        return handle

    def _of_this_run(self, message: SignedMessage) -> bool:
        if message.run == self.run_id:
            return True
        log.info("ignored a secure-round message of another run (%s)", message.run)
        return False

    def _secure_out(self, out: list[Outgoing]) -> None:
        """Sign and publish a secure round's messages; hand finished rounds on."""
        for o in out:
            message = self._signed(o.agent, o.message)
            self.client.publish(self.topics.down(o.agent, o.leaf), encode_message(message))
        if self.secure is not None:
            for result in self.secure.results():
                self._updates.put(result)

    def _tick(self) -> None:
        if self.secure is not None:
            self._secure_out(self.secure.tick())
        requests, decisions = self.intake.tick()
        for m in requests:
            request = ChunkRequest(
                run=self.run_id, agent_id=m.source, digest=m.digest, missing=m.indices
            )
            self.client.publish(
                self.topics.down(m.source, Down.REQUEST),
                encode_message(self._signed(m.source, request)),
            )
        for decision in decisions:
            self._decided(decision)
        for msg in self.dispatch.due_retries():  # each signed anew
            self._counters.task_retries += 1
            self.client.publish(self.topics.down(msg.agent_id, Down.TASK), encode_message(msg))
