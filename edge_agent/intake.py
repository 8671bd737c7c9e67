"""Task intake: the coordinator's tasks and the chunks of their blobs in, decisions out.

A task arrives as a signed :class:`TaskMessage` (read by
:func:`edge_agent.inbound.read`), then the chunks of its global model and, for an agent
that trains through ExecuTorch, of the training program it offers. The intake judges
the task, reserves room for its global model, asks for the program's chunks when it
does not hold it, reassembles blobs (duplicates and reordering tolerated, missing chunks
asked for again after a quiet period), refuses a global model that does not decode or
holds NaN/inf, and hands on each task once its global model and its program are here.

The coordinator's run is followed: a task of another run than the current one starts
that run, unless it was sent before the current run's first task (a task of an older
run, delivered late from a persistent session): that one is refused ``other_run``,
counted, logged once per run and not acknowledged. A chunk that does not fit its blob
is refused alone (the blob stays and the chunk is asked for again); a chunk of no
expected blob is dropped, counted and logged once per digest.

Each step returns a :class:`Decision`: acks of tasks to sign and publish, tasks ready to
train, program chunks to ask for, and a task repeated by the coordinator that must be
answered again with the update already sent. It never raises on bad input and needs no
broker: :class:`edge_agent.link.AgentLink` publishes what it decides. One thread (the
link's dispatcher) calls every method.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_agent.codec_state import CodecState
from edge_agent.inbound import Inbound
from edge_agent.programs import ProgramCache
from edge_agent.retries import MEMORY
from takfl.mqtt.blobs import REQUEST_BATCH, BlobReceiver, Missing
from takfl.state import State, non_finite_entry
from takfl.wire.chunking import ReassemblyLimits
from takfl.wire.downlink import BaseUnknown, ModelMismatch, received_model
from takfl.wire.errors import WireError
from takfl.wire.messages import Ack, TaskMessage, decode_chunk
from takfl.wire.validation import Refusal

log = logging.getLogger(__name__)

COORDINATOR = "coordinator"  # blob source name of the coordinator
LOGGED_DIGESTS = 256  # unexpected digests remembered so each is logged once


@dataclass(frozen=True)
class ReceivedTask:
    message: TaskMessage
    global_state: State  # decoded global model (float32 / exact ints)
    program: bytes | None = None  # the task's ExecuTorch training program, when it has one


@dataclass(frozen=True, kw_only=True)
class IntakePolicy:
    limits: ReassemblyLimits = field(
        default_factory=lambda: ReassemblyLimits(max_pending=4, timeout_s=600.0)
    )
    quiet_s: float = 5.0  # ask again for missing chunks after this long
    programs: bool = False  # fetch the training programs tasks offer (ExecuTorch agents)


@dataclass(kw_only=True)
class IntakeCounters:
    tasks: int = 0  # accepted, their global model expected
    bad_tasks: int = 0  # undecodable, badly signed, not for this agent, or too large
    blob_errors: int = 0  # chunks refused, digests failed, undecodable or non-finite blobs
    ignored_chunks: int = 0  # chunks of no expected blob
    refused: Counter[str] = field(default_factory=Counter)  # tasks refused, by Refusal value
    runs: int = 0  # runs of the coordinator seen (tasks of a new run)


@dataclass(frozen=True, kw_only=True)
class Decision:
    """The intake's answer to one message: what to publish, what to hand on."""

    acks: tuple[Ack, ...] = ()  # task acks (unsigned), to sign and publish
    ready: tuple[ReceivedTask, ...] = ()  # tasks whose blobs are all here, for next_task
    requests: tuple[Missing, ...] = ()  # chunks of the coordinator's blobs to ask for
    repeated: tuple[int, str] | None = None  # (round, global digest) of a task seen before


NOTHING = Decision()


class TaskIntake:
    """Judges tasks and reassembles their blobs for agent ``agent_id`` (see the module
    docstring). Not thread-safe."""

    def __init__(
        self,
        agent_id: str,
        policy: IntakePolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        held: CodecState | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.policy = policy or IntakePolicy()
        # the global models received (a downstream delta applies to one of them)
        self.held = held if held is not None else CodecState()
        self.receiver = BlobReceiver(self.policy.limits, quiet_s=self.policy.quiet_s, clock=clock)
        self.programs = ProgramCache()
        self.counters = IntakeCounters()
        self._waiting: dict[str, list[TaskMessage]] = {}  # global digest -> tasks needing it
        self._fetching: set[str] = set()  # digests of programs being received
        self._parked: dict[str, list[ReceivedTask]] = {}  # program digest -> tasks needing it
        self._seen: OrderedDict[tuple[int, str], None] = OrderedDict()  # (round, global digest)
        self.run = ""  # the coordinator's current run ("" before its first task)
        self._run_since = 0.0  # sent_at of the current run's first task
        self._old_runs: set[str] = set()  # older runs already logged
        self._logged: OrderedDict[str, None] = OrderedDict()  # unexpected digests logged

    def _ack(self, task: TaskMessage, reason: Refusal | None = None) -> Ack:
        """The ack of ``task``: accepted, or refused for ``reason`` (counted)."""
        if reason is not None:
            self.counters.refused[reason.value] += 1
        return Ack(
            subject="task",
            agent_id=self.agent_id,
            run=task.run,
            round_id=task.round_id,
            digest=task.blob.digest,
            accepted=reason is None,
            reason="ok" if reason is None else reason.value,
        )

    # -- tasks --------------------------------------------------------------------------
    def task(self, received: Inbound[TaskMessage]) -> Decision:
        """Judge a task; on acceptance, room is reserved for its global model and its
        program's chunks are asked for."""
        task = received.message
        if task is None:
            self._bad(received)
            return NOTHING
        if not self._follow_run(task):
            return NOTHING
        key = (task.round_id, task.blob.digest)
        if key in self._seen:
            return Decision(acks=(self._ack(task),), repeated=key)
        if task.base is not None and self.held.model(task.base) is None:
            log.info(
                "%s: round %d's model is a delta against %s, not held: asking for the full model",
                self.agent_id,
                task.round_id,
                task.base[:12],
            )
            return Decision(acks=(self._ack(task, Refusal.WRONG_BASE),))
        try:
            self.receiver.expect(COORDINATOR, task.blob)
        except WireError as e:
            self.counters.bad_tasks += 1
            log.warning(
                "%s: cannot take the global model of round %d: %s", self.agent_id, task.round_id, e
            )
            return Decision(acks=(self._ack(task, Refusal.TOO_LARGE),))
        self._seen[key] = None
        if len(self._seen) > MEMORY:
            self._seen.popitem(last=False)
        self._waiting.setdefault(task.blob.digest, []).append(task)
        self.counters.tasks += 1
        return Decision(acks=(self._ack(task),), requests=self._fetch_program(task))

    def _follow_run(self, task: TaskMessage) -> bool:
        """True if ``task`` is of the current run or starts a new one; False (counted,
        logged once per run) for a task of an older run."""
        if task.run == self.run:
            return True
        if self.run and task.sent_at < self._run_since:
            self.counters.refused[Refusal.OTHER_RUN.value] += 1
            if task.run not in self._old_runs:
                self._old_runs.add(task.run)
                log.warning("%s: ignoring tasks of an older run %s", self.agent_id, task.run)
            return False
        log.info("%s: the coordinator runs %s", self.agent_id, task.run or "(no run id)")
        self.run, self._run_since = task.run, task.sent_at
        self.counters.runs += 1
        return True

    def _bad(self, received: Inbound[TaskMessage]) -> None:
        """Count and log a task that cannot be acted on (it is not acknowledged)."""
        self.counters.bad_tasks += 1
        reason = received.verdict.reason or Refusal.MALFORMED
        self.counters.refused[reason.value] += 1
        if received.decoded is None:
            log.warning("%s: malformed task: %s", self.agent_id, received.verdict.detail)
        else:
            log.warning(
                "%s: refusing a task (round %d): %s",
                self.agent_id,
                received.decoded.round_id,
                received.verdict,
            )

    def _fetch_program(self, task: TaskMessage) -> tuple[Missing, ...]:
        """The chunks to ask for at once of a training program not held yet."""
        ref = task.program
        if ref is None or not self.policy.programs or ref.digest in self.programs:
            return ()
        try:
            if not self.receiver.expect(COORDINATOR, ref):
                return ()  # already being fetched
            self._fetching.add(ref.digest)
        except WireError as e:
            log.warning("%s: cannot take the training program: %s", self.agent_id, e)
            return ()
        missing = self.receiver.missing(COORDINATOR, ref.digest)[:REQUEST_BATCH]
        return (Missing(COORDINATOR, ref.digest, missing),)

    # -- chunks -------------------------------------------------------------------------
    def chunk(self, payload: bytes) -> Decision:
        """Store one chunk of an expected blob; the final one may release tasks."""
        try:
            chunk = decode_chunk(payload)
            if not self.receiver.is_pending(COORDINATOR, chunk.hex_digest):
                self._ignored(chunk.hex_digest)
                return NOTHING
            blob = self.receiver.add(COORDINATOR, chunk)
        except WireError as e:  # this chunk alone (a failed digest drops its blob)
            self.counters.blob_errors += 1
            log.warning("%s: bad global-model chunk: %s", self.agent_id, e)
            return NOTHING
        if blob is None:
            return NOTHING
        if chunk.hex_digest in self._fetching:
            return self._program_arrived(chunk.hex_digest, blob)
        return self._global_arrived(chunk.hex_digest, blob)

    def _ignored(self, digest: str) -> None:
        """Count a chunk of no expected blob; log the first of each digest."""
        self.counters.ignored_chunks += 1
        if digest in self._logged:
            return
        self._logged[digest] = None
        if len(self._logged) > LOGGED_DIGESTS:
            self._logged.popitem(last=False)
        log.info("%s: dropped chunks of %s: no task expects it", self.agent_id, digest[:12])

    def _program_arrived(self, digest: str, blob: bytes) -> Decision:
        self._fetching.discard(digest)
        self.programs.put(blob)
        return Decision(ready=self._release(self._parked.pop(digest, [])))

    def _global_arrived(self, digest: str, blob: bytes) -> Decision:
        """Decode and check a complete global model (a full one, or a delta applied to a
        held model and checked against the task's model digest); its tasks are released
        or refused (a poisoned or mismatched global is never trained on; the agent stays
        up). A refused delta makes the coordinator send the full model."""
        acks: list[Ack] = []
        ready: list[ReceivedTask] = []
        # tasks sharing the blob and the base share the outcome (counted once)
        outcomes: dict[tuple[str | None, str], tuple[State | None, Refusal | None]] = {}
        for t in self._waiting.pop(digest, []):
            key = (t.base, t.global_digest)
            if key not in outcomes:
                outcomes[key] = self._model(t, blob)
            state, reason = outcomes[key]
            if state is not None:
                ready.append(ReceivedTask(t, state))
            elif reason is not None:
                acks.append(self._ack(t, reason))
        return Decision(acks=tuple(acks), ready=self._release(ready))

    def _model(self, task: TaskMessage, blob: bytes) -> tuple[State | None, Refusal | None]:
        """The model ``task`` trains from, or why not (None: not answered)."""
        held = self.held.model(task.base) if task.base is not None else None
        try:
            state = received_model(
                blob,
                base=task.base,
                expected=task.global_digest,
                held=held,
                max_bytes=self.policy.limits.max_blob_bytes,
            )
        except BaseUnknown as e:
            log.warning("%s: %s", self.agent_id, e)
            return None, Refusal.WRONG_BASE
        except ModelMismatch as e:
            self.counters.blob_errors += 1
            log.warning("%s: global model of round %d: %s", self.agent_id, task.round_id, e)
            return None, Refusal.DIGEST_MISMATCH
        except WireError as e:
            self.counters.blob_errors += 1
            log.warning("%s: undecodable global model: %s", self.agent_id, e)
            return None, (Refusal.MALFORMED if task.base is not None else None)
        bad = non_finite_entry(state)
        if bad is not None:
            self.counters.blob_errors += 1
            log.warning("%s: refusing a global model with NaN/inf in %s", self.agent_id, bad)
            return None, Refusal.NON_FINITE
        self.held.keep_model(task.global_digest, state)
        return state, None

    def _release(self, received: list[ReceivedTask]) -> tuple[ReceivedTask, ...]:
        """Those of ``received`` ready to train; the ones whose program is not here yet are
        parked until it arrives."""
        ready = []
        for r in received:
            ref = r.message.program
            if ref is not None and r.program is None and self.policy.programs:
                program = self.programs.get(ref.digest)
                if program is None:
                    self._parked.setdefault(ref.digest, []).append(r)
                    continue
                r = ReceivedTask(r.message, r.global_state, program)
            ready.append(r)
        return tuple(ready)

    # -- periodic -----------------------------------------------------------------------
    def tick(self) -> list[Missing]:
        """Chunk requests now due; blobs that timed out are dropped with their tasks."""
        requests = self.receiver.due_requests()
        for _source, digest in self.receiver.expire():
            self._fetching.discard(digest)
            dropped = self._waiting.pop(digest, []) + self._parked.pop(digest, [])
            log.warning(
                "%s: global model %s timed out; %d task(s) dropped",
                self.agent_id,
                digest[:12],
                len(dropped),
            )
        return requests
