"""MQTT transport: the coordinator's end of the wire protocol (``takfl.wire``).

Per round it signs a task for every selected agent and sends it with the
prototype's global model (fp32 safetensors, chunked). Agents answer with a
signed header and a compressed delta blob in chunks. The blob is reassembled
(duplicates and reordering tolerated, missing chunks asked for again after a
quiet period), checked against its signed header, decoded, validated against
the global state the task carried, turned back into full weights and queued
for :meth:`next_update`. A refused update is logged with its reason, counted
in ``counters.refused`` and acknowledged negatively to the agent; it never
raises into the engine. Handlers are idempotent per (round, agent, digest).

Threads: the engine calls the Transport methods; paho's network thread only
queues messages; one dispatcher thread runs every handler and periodic check.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType

import torch

from coordinator.observe import FleetObserver
from coordinator.transport.base import ClientUpdate, Task, Transport
from takfl.config.profile import CommsSpec
from takfl.mqtt.blobs import BlobReceiver, BlobSender, BlobStore
from takfl.mqtt.client import MqttClient, MqttSettings, Will
from takfl.wire.chunking import ReassemblyLimits, blob_ref
from takfl.wire.codec import State, apply_delta, encode_state, max_encoded_bytes
from takfl.wire.errors import BlobTooLarge, DigestMismatch, WireError
from takfl.wire.messages import (
    Ack,
    AckSubject,
    BlobRef,
    ChunkRequest,
    GlobalAnnouncement,
    ModelRef,
    Registration,
    Status,
    TaskMessage,
    TrainingRef,
    UpdateHeader,
    decode_chunk,
    decode_message,
    encode_message,
)
from takfl.wire.signing import sign
from takfl.wire.topics import Down, Topics, Up
from takfl.wire.validation import (
    AgentRecord,
    Refusal,
    UpdateBounds,
    Verdict,
    check_header,
    check_registration,
    decode_update,
    refuse,
)

log = logging.getLogger(__name__)

COORDINATOR_ID = "coordinator"  # agent_id of the coordinator's own Status
GLOBAL_ENCODING = "fp32"  # global models travel uncompressed
MEMORY = 4096  # decided (round, agent, digest) keys remembered for idempotent re-acks
# Refusals of headers whose sender is not authenticated are not remembered: a forged
# header must not decide the fate of a genuine one with the same key.
UNAUTHENTICATED = frozenset({Refusal.UNKNOWN_AGENT, Refusal.BAD_SIGNATURE, Refusal.MALFORMED})
# Refusals that depend on where the coordinator itself is (an update that arrives before
# the coordinator, e.g. restarted with --resume, has sent that round's tasks) are not
# remembered either: the same update is welcome once the round is open.
NOT_YET = frozenset({Refusal.FUTURE_ROUND, Refusal.NOT_ASSIGNED})
NOT_REMEMBERED = UNAUTHENTICATED | NOT_YET


@dataclass(frozen=True)
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
    task_retry_s: float = 15.0  # send a task again when the agent has not acknowledged it
    max_sent_blobs: int = 16  # global blobs kept to answer chunk requests
    max_sent_bytes: int = 4 * 1024**3


@dataclass
class TransportCounters:
    accepted: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # by Refusal value
    registrations: int = 0
    malformed_chunks: int = 0
    ignored_chunks: int = 0  # chunks of no announced update
    chunk_requests_sent: int = 0
    chunks_resent: int = 0
    task_retries: int = 0


@dataclass
class AgentState:
    registration: Registration | None = None  # accepted registration
    online: bool = False


@dataclass
class _Assignment:
    message: TaskMessage
    reference: State  # the global state the agent's delta is relative to
    sent_at: float
    acked: bool = False


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
    ) -> None:
        """``on_allowance(agent, n)`` is called when an agent's first accepted registration
        pins its sample allowance (to persist it); ``observer`` hears of registrations,
        presence, tasks, accepted and refused updates (telemetry log, metrics)."""
        self.observer = observer or FleetObserver()
        self.topics = Topics(fleet)
        self.registry = dict(registry)
        self.num_classes = num_classes
        self.input_shape = input_shape
        self.policy = policy or TransportPolicy()
        self.clock = clock
        self.on_allowance = on_allowance
        self.counters = TransportCounters()
        p = self.policy
        offline = Status(agent_id=COORDINATOR_ID, state="offline", time=0.0)
        self.client = MqttClient(
            settings,
            client_id,
            will=Will(self.topics.coordinator_status(), encode_message(offline)),
        )
        self.sender = BlobSender(self.client, BlobStore(p.max_sent_blobs, p.max_sent_bytes))
        self.receiver = BlobReceiver(
            p.limits, quiet_s=p.quiet_s, max_total_bytes=p.max_total_bytes, clock=clock
        )
        self._lock = threading.Condition()
        self._agents: dict[str, AgentState] = {a: AgentState() for a in self.registry}
        self._round = -1
        self._assignments: dict[str, _Assignment] = {}
        self._accepted: set[tuple[int, str]] = set()  # (round, agent)
        self._incoming: dict[tuple[str, str], UpdateHeader] = {}  # (agent, digest) -> header
        self._decided: OrderedDict[tuple[int, str, str], Ack] = OrderedDict()
        self._updates: queue.Queue[ClientUpdate] = queue.Queue()
        t = self.topics
        self.client.route(t.up_filter(Up.REGISTER), self._on_register)
        self.client.route(t.up_filter(Up.STATUS), self._on_status)
        self.client.route(t.up_filter(Up.ACK), self._on_task_ack)
        self.client.route(t.up_filter(Up.REQUEST), self._on_request)
        self.client.route(t.up_filter(Up.UPDATE), self._on_update)
        self.client.route(t.up_filter(Up.CHUNK), self._on_chunk)
        self.client.on_connected(self._announce)
        self.client.every_tick(self._tick)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float | None = 10.0) -> MqttTransport:
        self.client.start(timeout)
        return self

    def close(self) -> None:
        offline = Status(agent_id=COORDINATOR_ID, state="offline", time=time.time())
        self.client.stop(final=(self.topics.coordinator_status(), encode_message(offline)))

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
        out: dict[str, list[str]] = {}
        with self._lock:
            for agent, st in sorted(self._agents.items()):
                if st.registration is not None and st.online:
                    out.setdefault(self.registry[agent].prototype, []).append(agent)
        return out

    def wait_for_agents(self, agents: list[str], timeout: float) -> bool:
        """Wait until every agent in ``agents`` is registered and online."""

        def ready() -> bool:
            return all(
                (st := self._agents.get(a)) is not None
                and st.online
                and st.registration is not None
                for a in agents
            )

        with self._lock:
            return self._lock.wait_for(ready, timeout)

    def send_tasks(self, tasks: list[Task]) -> None:
        """Sign and publish each task, then its global model's chunks."""
        if not tasks:
            return
        for t in tasks:
            record = self.registry.get(t.client_id)
            if record is None:
                raise KeyError(f"no provisioned agent {t.client_id!r}")
            if record.prototype != t.prototype:
                raise ValueError(
                    f"agent {t.client_id!r} trains {record.prototype!r}, not {t.prototype!r}"
                )
        refs: dict[tuple[int, str], BlobRef] = {}
        for t in tasks:
            if (t.round_id, t.prototype) not in refs:
                blob = encode_state(t.global_state, GLOBAL_ENCODING)
                refs[(t.round_id, t.prototype)] = self.sender.keep(
                    blob, self.policy.global_chunk_size
                )
        messages = [(t, self._task_message(t, refs[(t.round_id, t.prototype)])) for t in tasks]
        for (round_id, proto), ref in refs.items():
            n = sum(1 for t in tasks if (t.round_id, t.prototype) == (round_id, proto))
            self.observer.tasks_sent(round_id, proto, n, ref.size)
        with self._lock:
            newest = max(t.round_id for t in tasks)
            if newest > self._round:
                self._round = newest
                self._assignments = {}
                self._accepted = {k for k in self._accepted if k[0] >= newest}
            for t, msg in messages:
                if t.round_id == self._round:
                    ref_state = {k: v.detach().to("cpu") for k, v in t.global_state.items()}
                    self._assignments[t.client_id] = _Assignment(msg, ref_state, self.clock())
        for t, msg in messages:
            self.client.publish(self.topics.down(t.client_id, Down.TASK), encode_message(msg))
            self.sender.publish(self.topics.down(t.client_id, Down.CHUNK), msg.blob.digest)

    def next_update(self, timeout: float) -> ClientUpdate | None:
        try:
            return self._updates.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def publish_global(self, round_id: int, prototype: str, state: dict[str, torch.Tensor]) -> None:
        """Announce (retained) the digest and size of a prototype's new global model."""
        ref = blob_ref(encode_state(state, GLOBAL_ENCODING), self.policy.global_chunk_size)
        ann = GlobalAnnouncement(
            round_id=round_id, prototype=prototype, digest=ref.digest, size=ref.size
        )
        self.client.publish(self.topics.global_model(prototype), encode_message(ann), retain=True)

    # -- inspection --------------------------------------------------------------------------------
    def agents(self) -> dict[str, AgentState]:
        with self._lock:
            return {a: AgentState(s.registration, s.online) for a, s in self._agents.items()}

    def pending_transfers(self) -> int:
        """Update blobs announced and not yet complete."""
        with self._lock:
            return len(self._incoming)

    # -- helpers -----------------------------------------------------------------------------------
    def _task_message(self, t: Task, ref: BlobRef) -> TaskMessage:
        comms = self.policy.comms_by_prototype.get(t.prototype, self.policy.comms)
        msg = TaskMessage(
            round_id=t.round_id,
            agent_id=t.client_id,
            prototype=t.prototype,
            model=ModelRef(builder=t.model.builder, args=dict(t.model.args)),
            training=None
            if t.training is None
            else TrainingRef(
                epochs=t.training.epochs,
                batch_size=t.training.batch_size,
                optimizer=t.training.optimizer,
                learning_rate=t.training.learning_rate,
                weight_decay=t.training.weight_decay,
            ),
            num_classes=self.num_classes,
            input_shape=self.input_shape,
            seed=t.seed,
            deadline=t.deadline,
            compression=comms.compression,
            chunk_size=comms.chunk_size_kib * 1024,
            blob=ref,
        )
        return sign(msg, self.registry[t.client_id].secret)

    def _announce(self) -> None:
        online = Status(agent_id=COORDINATOR_ID, state="online", time=time.time())
        self.client.publish(self.topics.coordinator_status(), encode_message(online), retain=True)

    def _agent_of(self, topic: str) -> str | None:
        try:
            return self.topics.agent_of(topic)
        except WireError:
            return None

    def _ack(self, agent: str, ack: Ack) -> None:
        self.client.publish(self.topics.down(agent, Down.ACK), encode_message(ack))

    def _refuse(
        self,
        agent: str,
        verdict: Verdict,
        header: UpdateHeader | None = None,
        subject: AckSubject = "update",
    ) -> None:
        reason = verdict.reason or Refusal.MALFORMED
        self.counters.refused[reason.value] += 1
        record = self.registry.get(agent)
        self.observer.refused(
            agent,
            record.prototype if record else None,
            header.round_id if header else None,
            reason.value,
        )
        log.warning(
            "refused %s from %s (round %s): %s",
            subject,
            agent,
            header.round_id if header else "?",
            verdict,
        )
        ack = Ack(
            subject=subject,
            agent_id=agent,
            round_id=header.round_id if header else None,
            digest=header.blob.digest if header else None,
            accepted=False,
            reason=reason.value,
            detail=verdict.detail[:500],
        )
        if header is not None and reason not in NOT_REMEMBERED:
            self._decide(header, ack)
        self._ack(agent, ack)

    def _decide(self, header: UpdateHeader, ack: Ack) -> None:
        with self._lock:
            self._decided[header.key] = ack
            while len(self._decided) > MEMORY:
                self._decided.popitem(last=False)

    # -- handlers (dispatcher thread) -------------------------------------------------------------
    def _on_register(self, topic: str, payload: bytes) -> None:
        agent = self._agent_of(topic)
        if agent is None:
            return
        try:
            msg = decode_message(Registration, payload)
        except WireError as e:
            self._refuse(agent, refuse(Refusal.MALFORMED, str(e)), subject="register")
            return
        verdict = check_registration(msg, self.registry)
        if verdict.accepted and msg.agent_id != agent:
            verdict = refuse(Refusal.MALFORMED, "registration on another agent's topic")
        if not verdict.accepted:
            self._refuse(agent, verdict, subject="register")
            return
        pinned = None
        with self._lock:
            self._agents[agent].registration = msg
            record = self.registry[agent]
            if record.max_samples is None:  # registered once: the first count is the cap
                self.registry[agent] = replace(record, max_samples=msg.num_samples)
                pinned = msg.num_samples
            self._lock.notify_all()
        if pinned is not None and self.on_allowance is not None:
            self.on_allowance(agent, pinned)
        self.counters.registrations += 1
        self.observer.registered(agent, msg.prototype, msg.telemetry)
        self._ack(agent, Ack(subject="register", agent_id=agent, accepted=True))

    def _on_status(self, topic: str, payload: bytes) -> None:
        agent = self._agent_of(topic)
        try:
            msg = decode_message(Status, payload)
        except WireError as e:
            log.info("malformed status on %s: %s", topic, e)
            return
        if agent is None or agent not in self._agents or msg.agent_id != agent:
            return
        with self._lock:
            self._agents[agent].online = msg.state == "online"
            self._lock.notify_all()
        self.observer.presence(agent, self.registry[agent].prototype, msg.state == "online")

    def _on_task_ack(self, topic: str, payload: bytes) -> None:
        agent = self._agent_of(topic)
        try:
            ack = decode_message(Ack, payload)
        except WireError as e:
            log.info("malformed ack on %s: %s", topic, e)
            return
        with self._lock:
            a = self._assignments.get(agent or "")
            if (
                a is not None
                and ack.subject == "task"
                and ack.round_id == a.message.round_id
                and ack.digest == a.message.blob.digest
            ):
                a.acked = True
        if not ack.accepted:
            log.warning("agent %s refused its task: %s %s", agent, ack.reason, ack.detail)

    def _on_request(self, topic: str, payload: bytes) -> None:
        agent = self._agent_of(topic)
        try:
            request = decode_message(ChunkRequest, payload)
        except WireError as e:
            log.info("malformed chunk request on %s: %s", topic, e)
            return
        with self._lock:
            a = self._assignments.get(agent or "")
            allowed = a is not None and a.message.blob.digest == request.digest
        if allowed and agent is not None:  # an agent may fetch only its own task's model
            n = self.sender.answer(self.topics.down(agent, Down.CHUNK), request)
            self.counters.chunks_resent += n

    def _on_update(self, topic: str, payload: bytes) -> None:
        agent = self._agent_of(topic)
        if agent is None:
            return
        try:
            header = decode_message(UpdateHeader, payload)
        except WireError as e:
            self._refuse(agent, refuse(Refusal.MALFORMED, str(e)))
            return
        if header.agent_id != agent:
            self._refuse(agent, refuse(Refusal.MALFORMED, "header on another agent's topic"))
            return
        with self._lock:
            # a repeated header of this round gets the same answer; one of an earlier
            # round is checked again (and refused as stale)
            decided = self._decided.get(header.key) if header.round_id == self._round else None
            in_progress = (agent, header.blob.digest) in self._incoming
            verdict = self._check_header(agent, header)  # reads the registry under the lock
        if decided is not None:
            self._ack(agent, decided)
            return
        if in_progress:
            return
        if not verdict.accepted:
            self._refuse(agent, verdict, header)
            return
        try:
            self.receiver.expect(agent, header.blob)
        except BlobTooLarge as e:
            self._refuse(agent, refuse(Refusal.TOO_LARGE, str(e)), header)
            return
        except WireError as e:
            self._refuse(agent, refuse(Refusal.MALFORMED, str(e)), header)
            return
        with self._lock:
            self._incoming[(agent, header.blob.digest)] = header

    def _check_header(self, agent: str, header: UpdateHeader) -> Verdict:
        """Header checks against the current round (call with the lock held)."""
        a = self._assignments.get(agent)
        bounds = self.policy.bounds
        cap = bounds.max_blob_bytes
        if a is not None:
            cap = min(cap, max_encoded_bytes(a.reference))
        base = a.message.blob.digest if a is not None else None
        verdict = check_header(
            header, self.registry, current_round=self._round, base_digest=base, max_blob_bytes=cap
        )
        if not verdict.accepted or a is None:
            return verdict
        if (header.round_id, agent) in self._accepted:
            return refuse(Refusal.DUPLICATE, f"{agent} already delivered round {header.round_id}")
        if time.time() > a.message.deadline:
            return refuse(Refusal.EXPIRED, f"task deadline of round {header.round_id} passed")
        return verdict

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        agent = self._agent_of(topic)
        if agent is None:
            return
        try:
            chunk = decode_chunk(payload, max_payload=self.policy.max_chunk_bytes)
        except WireError as e:
            self.counters.malformed_chunks += 1
            log.info("malformed chunk from %s: %s", agent, e)
            return
        key = (agent, chunk.hex_digest)
        with self._lock:
            header = self._incoming.get(key)
        if header is None:
            self.counters.ignored_chunks += 1
            return
        try:
            blob = self.receiver.add(agent, chunk)
        except DigestMismatch as e:
            self._drop(key)
            self._refuse(agent, refuse(Refusal.DIGEST_MISMATCH, str(e)), header)
            return
        except WireError as e:
            self._drop(key)
            self._refuse(agent, refuse(Refusal.MALFORMED, str(e)), header)
            return
        if blob is not None:
            self._drop(key)
            self._complete(agent, header, blob)

    def _drop(self, key: tuple[str, str]) -> None:
        self.receiver.discard(*key)
        with self._lock:
            self._incoming.pop(key, None)

    def _complete(self, agent: str, header: UpdateHeader, blob: bytes) -> None:
        with self._lock:
            a = self._assignments.get(agent)
            current = a is not None and a.message.round_id == header.round_id
        if a is None or not current:
            self._refuse(
                agent, refuse(Refusal.STALE_ROUND, "round closed before it completed"), header
            )
            return
        verdict, delta = decode_update(header, blob, a.reference, bounds=self.policy.bounds)
        if delta is None:
            self._refuse(agent, verdict, header)
            return
        state = apply_delta(a.reference, delta)
        with self._lock:
            duplicate = (header.round_id, agent) in self._accepted
            if not duplicate:
                self._accepted.add((header.round_id, agent))
        if duplicate:
            self._refuse(agent, refuse(Refusal.DUPLICATE, "already delivered"), header)
            return
        metrics = dict(header.metrics) | {"upload_bytes": float(header.blob.size)}
        self._updates.put(
            ClientUpdate(
                header.round_id, header.prototype, agent, header.num_samples, state, metrics
            )
        )
        self.counters.accepted += 1
        self.observer.accepted(header)
        ack = Ack(
            subject="update",
            agent_id=agent,
            round_id=header.round_id,
            digest=header.blob.digest,
            accepted=True,
        )
        self._decide(header, ack)
        self._ack(agent, ack)

    def _tick(self) -> None:
        for agent, request in self.receiver.due_requests():
            self.counters.chunk_requests_sent += 1
            self.client.publish(self.topics.down(agent, Down.REQUEST), encode_message(request))
        for agent, digest in self.receiver.expire():
            with self._lock:
                header = self._incoming.pop((agent, digest), None)
            if header is not None:
                self._refuse(agent, refuse(Refusal.EXPIRED, "blob incomplete at timeout"), header)
        with self._lock:
            stale = [(k, h) for k, h in self._incoming.items() if h.round_id < self._round]
        for key, header in stale:
            self._drop(key)
            self._refuse(key[0], refuse(Refusal.STALE_ROUND, "round closed"), header)
        self._retry_tasks()

    def _retry_tasks(self) -> None:
        now, wall = self.clock(), time.time()
        with self._lock:
            due = [
                (agent, a.message)
                for agent, a in self._assignments.items()
                if not a.acked
                and now - a.sent_at >= self.policy.task_retry_s
                and wall < a.message.deadline
            ]
            for agent, _ in due:
                self._assignments[agent].sent_at = now
        for agent, msg in due:
            self.counters.task_retries += 1
            self.client.publish(self.topics.down(agent, Down.TASK), encode_message(msg))
