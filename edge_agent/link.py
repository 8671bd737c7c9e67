"""The agent's end of the MQTT protocol: register, receive tasks with their global
model, send signed compressed updates.

Usage::

    with AgentLink(settings, "lab", identity) as link:
        task = link.next_task(timeout=60)          # TaskMessage + decoded global state
        ...train from task.global_state...
        header = link.send_update(task, trained_state, num_samples=n)
        ack = link.wait_ack(header.blob.digest, timeout=60)

Presence: a retained ``online`` status on connect, ``offline`` as last will and
on close, all signed and stamped with the connection's start time. The signed
registration is published (retained) on every connect. Everything the agent acts on
(tasks, acks, chunk requests, global announcements) must be signed with its secret and
addressed to it; anything else is ignored and logged. Chunk requests are answered
within the :class:`ResendLimits` of the link policy.
A task is acknowledged on receipt; its global blob is reassembled and missing
chunks are asked for again. An update header is announced again every
``ack_timeout_s`` until the coordinator acknowledges it or the task's deadline
passes; the blob stays in a bounded store to answer chunk requests. The latest
announcement of the prototype's new global model is kept (``wait_global``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import torch

from edge_agent.programs import ProgramCache
from edge_agent.retries import MEMORY, UpdateRetries
from takfl.config.profile import HardwareClass
from takfl.mqtt.blobs import REQUEST_BATCH, BlobReceiver, BlobSender, BlobStore
from takfl.mqtt.client import MqttClient, MqttSettings, Will
from takfl.mqtt.ratelimit import ResendLimiter, ResendLimits
from takfl.wire.chunking import ReassemblyLimits
from takfl.wire.codec import decode_state
from takfl.wire.errors import WireError
from takfl.wire.messages import (
    Ack,
    ChunkRequest,
    Compression,
    GlobalAnnouncement,
    Registration,
    SignedMessage,
    Status,
    TaskMessage,
    UpdateHeader,
    decode_chunk,
    decode_message,
    encode_message,
)
from takfl.wire.signing import message_ref, sign, verify
from takfl.wire.telemetry import Telemetry
from takfl.wire.topics import Down, Topics, Up, check_ident
from takfl.wire.update import PreparedUpdate, prepare_update

log = logging.getLogger(__name__)

COORDINATOR = "coordinator"  # blob source name of the coordinator
REGISTER_KEY = "register"  # key of the registration ack in wait_ack


@dataclass(frozen=True)
class AgentIdentity:
    """Who this agent is, as provisioned on the coordinator."""

    agent_id: str
    prototype: str
    secret: bytes = field(repr=False)
    profile: str = "custom"
    hardware_class: HardwareClass = "raspberry-pi"
    num_samples: int = 0


@dataclass(frozen=True)
class LinkPolicy:
    quiet_s: float = 5.0  # ask again for missing global-model chunks after this long
    ack_timeout_s: float = 15.0  # announce an update header again after this long without ack
    limits: ReassemblyLimits = field(
        default_factory=lambda: ReassemblyLimits(max_pending=4, timeout_s=600.0)
    )
    max_sent_blobs: int = 4  # update blobs kept to answer chunk requests
    max_tasks: int = 16  # received tasks waiting for next_task
    resend: ResendLimits = field(default_factory=ResendLimits)  # answers to chunk requests
    programs: bool = False  # fetch the training programs tasks offer (ExecuTorch agents)


@dataclass(frozen=True)
class ReceivedTask:
    message: TaskMessage
    global_state: dict[str, torch.Tensor]  # decoded global model (float32 / exact ints)
    program: bytes | None = None  # the task's ExecuTorch training program, when it has one


@dataclass
class LinkCounters:
    tasks: int = 0
    bad_tasks: int = 0  # undecodable, badly signed or not for this agent
    blob_errors: int = 0  # chunks refused, digests failed, undecodable blobs
    ignored_chunks: int = 0  # chunks of no expected blob
    requests_answered: int = 0
    header_retries: int = 0
    unauthenticated: int = 0  # acks, requests, announcements not signed for this agent


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
    ) -> None:
        check_ident(identity.agent_id, "agent id")
        self.identity = identity
        self.telemetry = telemetry  # what the registration reports, built at each connect
        self.policy = policy or LinkPolicy()
        self.topics = Topics(fleet)
        self.clock = clock
        self.wall_clock = wall_clock
        self.counters = LinkCounters()
        me = identity.agent_id
        self.client = MqttClient(settings, me, will=self._will)
        self.sender = BlobSender(
            self.client,
            BlobStore(max_blobs=self.policy.max_sent_blobs),
            ResendLimiter(self.policy.resend, clock=clock),
        )
        self.receiver = BlobReceiver(self.policy.limits, quiet_s=self.policy.quiet_s, clock=clock)
        self._waiting: dict[str, list[TaskMessage]] = {}  # global digest -> tasks needing it
        self.programs = ProgramCache()
        self._fetching: set[str] = set()  # digests of programs being received
        self._parked: dict[str, list[ReceivedTask]] = {}  # program digest -> tasks needing it
        self._seen: OrderedDict[tuple[int, str], None] = OrderedDict()  # (round, global digest)
        self._ready: queue.Queue[ReceivedTask] = queue.Queue(maxsize=self.policy.max_tasks)
        # Unacknowledged headers and updates already sent, by (round, global digest): a task
        # repeated by a coordinator that restarted mid-round is answered with the same update.
        self.retries = UpdateRetries(
            ack_timeout_s=self.policy.ack_timeout_s,
            max_answered=self.policy.max_sent_blobs,
            clock=clock,
            wall_clock=wall_clock,
        )
        self._cond = threading.Condition()
        self._global: GlobalAnnouncement | None = None  # latest of this agent's prototype
        self._registrations: deque[str] = deque(maxlen=8)  # message_ref of recent ones
        self.client.route(self.topics.down(me, Down.TASK), self._on_task)
        self.client.route(self.topics.down(me, Down.CHUNK), self._on_chunk)
        self.client.route(self.topics.down(me, Down.REQUEST), self._on_request)
        self.client.route(self.topics.down(me, Down.ACK), self._on_ack)
        self.client.route(self.topics.down(me, Down.GLOBAL), self._on_global)
        self.client.on_connected(self._announce)
        self.client.every_tick(self._tick)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float | None = 10.0) -> AgentLink:
        self.client.start(timeout)
        return self

    def close(self) -> None:
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
        i = self.identity
        reg = Registration(
            agent_id=i.agent_id,
            prototype=i.prototype,
            profile=i.profile,
            hardware_class=i.hardware_class,
            num_samples=i.num_samples,
            sent_at=self.wall_clock(),
            telemetry=self.telemetry() if self.telemetry is not None else None,
        )
        return sign(reg, i.secret)

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
        compression: Compression | None = None,
        telemetry: Telemetry | None = None,
    ) -> UpdateHeader:
        """Encode ``trained - global`` as the task asks, sign, and send header and chunks."""
        prepared = prepare_update(
            task.message,
            trained,
            task.global_state,
            secret=self.identity.secret,
            num_samples=num_samples,
            metrics=metrics,
            compression=compression,
            telemetry=telemetry,
        )
        self.send_prepared(prepared, deadline=task.message.deadline)
        return prepared.header

    def send_prepared(
        self,
        prepared: PreparedUpdate,
        *,
        deadline: float,
        chunk_indices: Iterable[int] | None = None,
    ) -> None:
        """Send a prepared update: keep the blob, publish the header, then the chunks
        (all, or only ``chunk_indices``; the rest can be requested)."""
        header = prepared.header
        self.sender.keep(prepared.blob, header.blob.chunk_size)
        with self._cond:
            self.retries.sent(header, deadline)
        me = self.identity.agent_id
        self.client.publish(self.topics.up(me, Up.UPDATE), encode_message(header))
        self.sender.publish(self.topics.up(me, Up.CHUNK), header.blob.digest, chunk_indices)

    def traffic(self) -> tuple[int, int, int]:
        """(payload bytes sent, bytes received, retries: headers announced again plus
        reconnects) since the link started."""
        c = self.client.counters
        return c.bytes_sent, c.bytes_received, self.counters.header_retries + max(0, c.connects - 1)

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
        end = self.clock() + timeout
        with self._cond:
            while (ack := self.retries.ack(key)) is None:
                left = end - self.clock()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return ack

    # -- presence ---------------------------------------------------------------------------
    def _status_topic(self) -> str:
        return self.topics.up(self.identity.agent_id, Up.STATUS)

    def _status(self, state: Literal["online", "offline"], at: float | None = None) -> bytes:
        """A signed status of the connection that started at ``at`` (the current one)."""
        when = self.client.connection_time if at is None else at
        msg = Status(agent_id=self.identity.agent_id, state=state, time=when)
        return encode_message(sign(msg, self.identity.secret))

    def _will(self, connection_time: float) -> Will:
        return Will(self._status_topic(), self._status("offline", connection_time))

    def _authentic(self, message: SignedMessage, what: str) -> bool:
        """True if ``message`` is signed with this agent's secret and addressed to it."""
        if verify(message, self.identity.secret) and (
            getattr(message, "agent_id", None) == self.identity.agent_id
        ):
            return True
        self.counters.unauthenticated += 1
        log.warning("%s: ignored an unauthenticated %s", self.identity.agent_id, what)
        return False

    # -- handlers (dispatcher thread) -----------------------------------------------------------
    def _announce(self) -> None:
        me = self.identity.agent_id
        registration = self.registration()
        with self._cond:
            self._registrations.append(message_ref(registration))
        self.client.publish(self._status_topic(), self._status("online"), retain=True)
        self.client.publish(
            self.topics.up(me, Up.REGISTER), encode_message(registration), retain=True
        )

    def _ack_task(self, task: TaskMessage, accepted: bool, reason: str = "ok") -> None:
        ack = Ack(
            subject="task",
            agent_id=self.identity.agent_id,
            round_id=task.round_id,
            digest=task.blob.digest,
            accepted=accepted,
            reason=reason,
        )
        signed = sign(ack, self.identity.secret)
        self.client.publish(self.topics.up(self.identity.agent_id, Up.ACK), encode_message(signed))

    def _on_task(self, _topic: str, payload: bytes) -> None:
        try:
            task = decode_message(TaskMessage, payload)
        except WireError as e:
            self.counters.bad_tasks += 1
            log.warning("%s: malformed task: %s", self.identity.agent_id, e)
            return
        i = self.identity
        if (
            not verify(task, i.secret)
            or task.agent_id != i.agent_id
            or task.prototype != i.prototype
        ):
            self.counters.bad_tasks += 1
            log.warning(
                "%s: refusing a task not signed for it (round %d)", i.agent_id, task.round_id
            )
            return
        key = (task.round_id, task.blob.digest)
        if key in self._seen:
            self._ack_task(task, True)
            self._answer_again(key)
            return
        try:
            self.receiver.expect(COORDINATOR, task.blob)
        except WireError as e:
            self.counters.bad_tasks += 1
            log.warning(
                "%s: cannot take the global model of round %d: %s", i.agent_id, task.round_id, e
            )
            self._ack_task(task, False, "too_large")
            return
        self._seen[key] = None
        if len(self._seen) > MEMORY:
            self._seen.popitem(last=False)
        self._waiting.setdefault(task.blob.digest, []).append(task)
        self.counters.tasks += 1
        self._ack_task(task, True)
        self._fetch_program(task)

    def _fetch_program(self, task: TaskMessage) -> None:
        """Ask at once for the chunks of a training program not held yet."""
        ref = task.program
        if ref is None or not self.policy.programs or ref.digest in self.programs:
            return
        try:
            if not self.receiver.expect(COORDINATOR, ref):
                return  # already being fetched
            self._fetching.add(ref.digest)
        except WireError as e:
            log.warning("%s: cannot take the training program: %s", self.identity.agent_id, e)
            return
        me = self.identity.agent_id
        missing = self.receiver.missing(COORDINATOR, ref.digest)[:REQUEST_BATCH]
        request = sign(
            ChunkRequest(agent_id=me, digest=ref.digest, missing=missing), self.identity.secret
        )
        self.client.publish(self.topics.up(me, Up.REQUEST), encode_message(request))

    def _answer_again(self, key: tuple[int, str]) -> None:
        """Re-announce the update already sent for a repeated task, if its blob is kept."""
        with self._cond:
            header = self.retries.answer_for(key)
        if header is None:
            return
        me = self.identity.agent_id
        log.info("%s: task of round %d repeated; sending the same update again", me, key[0])
        self.client.publish(self.topics.up(me, Up.UPDATE), encode_message(header))
        self.sender.publish(self.topics.up(me, Up.CHUNK), header.blob.digest)

    def _on_chunk(self, _topic: str, payload: bytes) -> None:
        try:
            chunk = decode_chunk(payload)
            if not self.receiver.is_pending(COORDINATOR, chunk.hex_digest):
                self.counters.ignored_chunks += 1
                return
            blob = self.receiver.add(COORDINATOR, chunk)
        except WireError as e:
            self.counters.blob_errors += 1
            log.warning("%s: bad global-model chunk: %s", self.identity.agent_id, e)
            return
        if blob is None:
            return
        if chunk.hex_digest in self._fetching:
            self._fetching.discard(chunk.hex_digest)
            self.programs.put(blob)
            for received in self._parked.pop(chunk.hex_digest, []):
                self._release(received)
            return
        tasks = self._waiting.pop(chunk.hex_digest, [])
        try:
            state = decode_state(blob, max_bytes=self.policy.limits.max_blob_bytes)
        except WireError as e:
            self.counters.blob_errors += 1
            log.warning("%s: undecodable global model: %s", self.identity.agent_id, e)
            return
        bad = next(
            (k for k, t in state.items() if t.is_floating_point() and not t.isfinite().all()),
            None,
        )
        if bad is not None:  # a poisoned global is never trained on; the agent stays up
            self.counters.blob_errors += 1
            log.warning(
                "%s: refusing a global model with NaN/inf in %s", self.identity.agent_id, bad
            )
            for task in tasks:
                self._ack_task(task, False, "non_finite")
            return
        for task in tasks:
            self._release(ReceivedTask(task, state))

    def _release(self, received: ReceivedTask) -> None:
        """Hand a task whose global model arrived to next_task, once its program is here."""
        ref = received.message.program
        if ref is not None and received.program is None and self.policy.programs:
            program = self.programs.get(ref.digest)
            if program is None:
                self._parked.setdefault(ref.digest, []).append(received)
                return
            received = ReceivedTask(received.message, received.global_state, program)
        try:
            self._ready.put_nowait(received)
        except queue.Full:
            log.warning(
                "%s: task queue full; dropped round %d",
                self.identity.agent_id,
                received.message.round_id,
            )

    def _on_request(self, _topic: str, payload: bytes) -> None:
        try:
            request = decode_message(ChunkRequest, payload)
        except WireError as e:
            log.warning("%s: malformed chunk request: %s", self.identity.agent_id, e)
            return
        if not self._authentic(request, "chunk request"):
            return
        topic = self.topics.up(self.identity.agent_id, Up.CHUNK)
        sent = self.sender.answer(topic, request, COORDINATOR)
        self.counters.requests_answered += int(sent > 0)

    def _on_global(self, _topic: str, payload: bytes) -> None:
        try:
            ann = decode_message(GlobalAnnouncement, payload)
        except WireError as e:
            log.warning("%s: malformed global announcement: %s", self.identity.agent_id, e)
            return
        if not self._authentic(ann, "global announcement"):
            return
        if ann.prototype != self.identity.prototype:
            return
        with self._cond:
            if self._global is None or ann.round_id >= self._global.round_id:
                self._global = ann
            self._cond.notify_all()

    def _on_ack(self, _topic: str, payload: bytes) -> None:
        try:
            ack = decode_message(Ack, payload)
        except WireError as e:
            log.warning("%s: malformed ack: %s", self.identity.agent_id, e)
            return
        if not self._authentic(ack, f"{ack.subject} ack"):
            return
        if ack.subject == "register":
            with self._cond:
                mine = ack.digest in self._registrations
            if not mine:
                log.info("%s: ignored an ack of another registration", self.identity.agent_id)
                return
        key = REGISTER_KEY if ack.subject == "register" else ack.digest
        if key is None:
            return
        if not ack.accepted:
            log.warning(
                "%s: coordinator refused %s: %s %s",
                self.identity.agent_id,
                ack.subject,
                ack.reason,
                ack.detail,
            )
        with self._cond:
            self.retries.acknowledged(key, ack)
            self._cond.notify_all()

    def _tick(self) -> None:
        me = self.identity.agent_id
        for m in self.receiver.due_requests():
            request = ChunkRequest(agent_id=me, digest=m.digest, missing=m.indices)
            signed = sign(request, self.identity.secret)
            self.client.publish(self.topics.up(me, Up.REQUEST), encode_message(signed))
        for _source, digest in self.receiver.expire():
            self._fetching.discard(digest)
            dropped = self._waiting.pop(digest, []) + self._parked.pop(digest, [])
            log.warning(
                "%s: global model %s timed out; %d task(s) dropped", me, digest[:12], len(dropped)
            )
        with self._cond:
            due = self.retries.due()
        self.counters.header_retries += len(due)
        for header in due:
            self.client.publish(self.topics.up(me, Up.UPDATE), encode_message(header))
