"""Update intake: announced update headers and their chunks in, verdicts out.

An agent's update arrives as a signed :class:`UpdateHeader` and then the chunks of its
delta blob. The intake checks the header against the agent's current assignment,
reserves room for the blob, reassembles it (duplicates and reordering tolerated,
missing chunks asked for again after a quiet period), decodes and validates the delta
and rebuilds the full weights. Each step returns a :class:`Decision`: an ack for the
agent and, once an update is accepted, the :class:`ClientUpdate` for the engine. It
never raises on bad input and needs no broker: the MQTT transport publishes what it
decides.

Before anything else a header must come from a provisioned agent and verify under its
secret, belong to the coordinator's current run (else ``other_run``: answered, never
acted on, logged once per run), be fresh (else ``stale_message`` or ``replayed``:
counted and logged, never answered) and arrive before the run finished (else
``run_finished``). An update must be encoded as its task's compression
(``codec_mismatch``). A chunk that does not fit its announcement (count, payload length)
is refused alone and counted; the update stays pending and the chunk is asked for
again. A chunk of a digest nobody announced is dropped, counted and logged once per
digest.

A decision is remembered by the content of the header it answers (a hash of its signed
fields without ``sent_at``, ``nonce`` and ``signature``: an agent re-announces a header
with a fresh nonce), so a repeated header gets the same answer while a different header,
even one announcing the same blob, is judged on its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from coordinator.transport.base import ClientUpdate
from coordinator.transport.dispatch import TaskDispatch
from coordinator.transport.inbound import Inbound
from takfl.mqtt.blobs import BlobReceiver, Missing
from takfl.wire.bounds import StateBounds, check_state
from takfl.wire.chunking import ReassemblyLimits
from takfl.wire.codec import apply_delta
from takfl.wire.codecs import resolve_codec
from takfl.wire.errors import BlobTooLarge, DigestMismatch, WireError
from takfl.wire.freshness import ReplayGuard
from takfl.wire.messages import Ack, UpdateHeader, decode_chunk
from takfl.wire.signing import verify
from takfl.wire.validation import (
    ACCEPTED,
    AgentRecord,
    Refusal,
    UpdateBounds,
    Verdict,
    check_header,
    decode_update,
    refuse,
)

log = logging.getLogger(__name__)

MEMORY = 4096  # decided headers remembered for idempotent re-acks (at least 2 per agent)
# Refusals of headers whose sender is not authenticated are not remembered: a forged
# header must not decide the fate of a genuine one.
UNAUTHENTICATED = frozenset({Refusal.UNKNOWN_AGENT, Refusal.BAD_SIGNATURE, Refusal.MALFORMED})
# Refusals that depend on where the coordinator itself is (an update that arrives before
# the coordinator, e.g. restarted with --resume, has sent that round's tasks) are not
# remembered either: the same update is welcome once the round is open.
NOT_YET = frozenset({Refusal.FUTURE_ROUND, Refusal.NOT_ASSIGNED})
# Neither are refusals that say where the run is rather than what the header holds.
RUN_STATE = frozenset({Refusal.OTHER_RUN, Refusal.RUN_FINISHED})
NOT_REMEMBERED = UNAUTHENTICATED | NOT_YET | RUN_STATE
# Stale and replayed messages are never answered (an answer to a replayed copy could be
# taken for the answer to the genuine header): counted and logged only.
SILENT = frozenset({Refusal.STALE_MESSAGE, Refusal.REPLAYED})
# A refusal that is not about the sender, the run's state or which round it is, sent to an
# authenticated agent, is its final answer to its task: the agent stops offering that update
# (its outbox takes the refusal as the ack), so the round engine stops awaiting it.
NOT_AN_ANSWER = (
    NOT_REMEMBERED
    | SILENT
    | {
        Refusal.UNSUPPORTED_VERSION,
        Refusal.STALE_ROUND,
        Refusal.DUPLICATE,
    }
)


LOGGED_DIGESTS = 1024  # unannounced digests remembered so each is logged once


@dataclass(frozen=True, kw_only=True)
class IntakePolicy:
    bounds: UpdateBounds = field(default_factory=UpdateBounds)
    limits: ReassemblyLimits = field(  # per agent
        default_factory=lambda: ReassemblyLimits(max_pending=2, timeout_s=600.0)
    )
    max_total_bytes: int = 4 * 1024**3  # reassembly buffers across all agents
    max_chunk_bytes: int = 16 * 1024 * 1024  # payload of one received chunk
    quiet_s: float = 5.0  # ask again for missing update chunks after this long


@dataclass(kw_only=True)
class IntakeCounters:
    accepted: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # by Refusal value
    malformed_chunks: int = 0
    bad_chunks: int = 0  # chunks that did not fit their announcement (refused alone)
    ignored_chunks: int = 0  # chunks of no announced update
    chunk_requests_sent: int = 0


@dataclass(frozen=True, kw_only=True)
class Decision:
    """The intake's answer to one message: what to tell the agent, what to hand on."""

    agent: str | None
    verdict: Verdict
    ack: Ack | None = None  # publish to ``agent`` when set
    update: ClientUpdate | None = None  # an accepted update for the engine
    header: UpdateHeader | None = None  # the accepted update's header

    @property
    def accepted(self) -> bool:
        return self.update is not None


def refused_answer(decision: Decision) -> tuple[int, str] | None:
    """(round, agent) when ``decision`` refuses an agent's answer to its task for good."""
    ack, reason = decision.ack, decision.verdict.reason
    if decision.agent is None or ack is None or ack.accepted or ack.round_id is None:
        return None
    if ack.subject != "update" or reason is None or reason in NOT_AN_ANSWER:
        return None
    return ack.round_id, decision.agent


NOTHING = Decision(agent=None, verdict=Verdict())


SecureInput = Callable[[str, UpdateHeader, bytes], Verdict]


class UpdateIntake:
    """Judges update headers and chunks. ``header``, ``chunk`` and ``tick`` run on one
    thread (the transport's dispatcher); ``pending`` may be called from any."""

    def __init__(
        self,
        registry: Mapping[str, AgentRecord],
        dispatch: TaskDispatch,
        policy: IntakePolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        guard: ReplayGuard | None = None,
        secure_input: SecureInput | None = None,
    ) -> None:
        """``guard`` refuses stale and replayed headers (None: no freshness check);
        ``secure_input(agent, header, blob)`` takes the masked input of a task of a
        secure round (the blob is never decoded here)."""
        self.secure_input = secure_input
        self.registry = registry
        self.dispatch = dispatch
        self.guard = guard
        self.policy = policy or IntakePolicy()
        p = self.policy
        self.receiver = BlobReceiver(
            p.limits, quiet_s=p.quiet_s, max_total_bytes=p.max_total_bytes, clock=clock
        )
        self.counters = IntakeCounters()
        self.memory = max(MEMORY, 2 * len(registry))  # two rounds of every agent's header
        self._lock = threading.Lock()
        self._incoming: dict[tuple[str, str], UpdateHeader] = {}  # (agent, digest) -> header
        self._accepted: set[tuple[int, str]] = set()  # (round, agent)
        self._decided: OrderedDict[str, Ack] = OrderedDict()  # content_ref -> answer
        self._other_runs: set[str] = set()  # runs already logged
        self._logged: OrderedDict[str, None] = OrderedDict()  # unannounced digests logged
        # per prototype, from the run's initial models (the engine sets them): per-tensor
        # and buffer bounds, and the reference of the whole-delta norm bound
        self.state_bounds: dict[str, StateBounds] = {}

    # -- verdicts -----------------------------------------------------------------------
    def _refuse(self, agent: str, verdict: Verdict, header: UpdateHeader | None) -> Decision:
        reason = verdict.reason or Refusal.MALFORMED
        self.counters.refused[reason.value] += 1
        if reason in SILENT:
            log.warning("ignored update header from %s: %s", agent, verdict)
            return Decision(agent=agent, verdict=verdict)
        if reason is Refusal.OTHER_RUN and header is not None:
            if header.run not in self._other_runs:
                self._other_runs.add(header.run)
                log.warning("updates of another run (%s) arrive, e.g. from %s", header.run, agent)
        else:
            log.warning(
                "refused update from %s (round %s): %s",
                agent,
                header.round_id if header else "?",
                verdict,
            )
        ack = Ack(
            subject="update",
            agent_id=agent,
            run=header.run if header else "",
            round_id=header.round_id if header else None,
            digest=header.blob.digest if header else None,
            accepted=False,
            reason=reason.value,
            detail=verdict.detail[:500],
        )
        if header is not None and reason not in NOT_REMEMBERED:
            self._remember(header, ack)
        return Decision(agent=agent, verdict=verdict, ack=ack)

    def _accept(self, agent: str, header: UpdateHeader) -> Ack:
        """The ack of an accepted update, remembered for the header's repeats."""
        ack = Ack(
            subject="update",
            agent_id=agent,
            run=header.run,
            round_id=header.round_id,
            digest=header.blob.digest,
            accepted=True,
        )
        self._remember(header, ack)
        return ack

    def _remember(self, header: UpdateHeader, ack: Ack) -> None:
        with self._lock:
            self._decided[header.content_ref()] = ack
            while len(self._decided) > self.memory:
                self._decided.popitem(last=False)

    # -- headers ------------------------------------------------------------------------
    def header(self, received: Inbound[UpdateHeader]) -> Decision:
        """Judge an announced update; on acceptance, room is reserved for its blob."""
        agent, header = received.agent, received.message
        if agent is None:
            return NOTHING
        if header is None:
            return self._refuse(agent, received.verdict, None)
        admitted = self.admit(agent, header)
        if not admitted.accepted:
            return self._refuse(agent, admitted, header)
        round_id = self.dispatch.current_round()
        with self._lock:
            # a repeated header of this round gets the same answer; one of an earlier
            # round is checked again (and refused as stale)
            decided = (
                self._decided.get(header.content_ref()) if header.round_id == round_id else None
            )
            in_progress = (agent, header.blob.digest) in self._incoming
        if decided is not None:
            return Decision(agent=agent, verdict=Verdict(), ack=decided)
        if in_progress:
            return NOTHING
        verdict = self.check(agent, header, round_id)
        if not verdict.accepted:
            return self._refuse(agent, verdict, header)
        try:
            self.receiver.expect(agent, header.blob)
        except BlobTooLarge as e:
            return self._refuse(agent, refuse(Refusal.TOO_LARGE, str(e)), header)
        except WireError as e:
            return self._refuse(agent, refuse(Refusal.MALFORMED, str(e)), header)
        with self._lock:
            self._incoming[(agent, header.blob.digest)] = header
        return Decision(agent=agent, verdict=verdict)

    def admit(self, agent: str, header: UpdateHeader) -> Verdict:
        """Who sent it, for which run, when: a provisioned agent's signature, the current
        run, fresh, and the run not finished."""
        record = self.registry.get(agent)
        if record is None:
            return refuse(Refusal.UNKNOWN_AGENT, f"agent {agent!r} is not provisioned")
        if not verify(header, record.secret):
            return refuse(Refusal.BAD_SIGNATURE, f"update header of {agent!r}")
        if header.run != self.dispatch.run:
            return refuse(Refusal.OTHER_RUN, f"run {header.run!r}, this run is {self.dispatch.run}")
        if self.guard is not None:
            verdict = self.guard.check(agent, header.sent_at, header.nonce)
            if not verdict.accepted:
                return verdict
        if self.dispatch.finished:
            return refuse(Refusal.RUN_FINISHED, f"run {self.dispatch.run} has ended")
        return ACCEPTED

    def check(self, agent: str, header: UpdateHeader, round_id: int) -> Verdict:
        """Header checks against the agent's assignment in round ``round_id``."""
        a = self.dispatch.assignment(agent)
        bounds = self.policy.bounds
        cap = bounds.max_blob_bytes
        secure = a.message.secagg if a is not None else None
        if secure is not None:  # a masked input: exactly ``length`` words
            cap = min(cap, secure.bits // 8 * secure.length)
        elif a is not None:
            cap = min(cap, resolve_codec(a.message.compression).max_bytes(a.reference))
        base = a.message.global_digest if a is not None else None
        verdict = check_header(
            header, self.registry, current_round=round_id, base_digest=base, max_blob_bytes=cap
        )
        if not verdict.accepted or a is None:
            return verdict
        with self._lock:
            done = (header.round_id, agent) in self._accepted
        if done:
            return refuse(Refusal.DUPLICATE, f"{agent} already delivered round {header.round_id}")
        if header.compression != a.message.compression:
            return refuse(
                Refusal.CODEC_MISMATCH,
                f"update in {header.compression}, its task asked {a.message.compression}",
            )
        # a masked input comes after the keys and shares stages: its secure round's stage
        # timing decides, not the task's deadline
        if secure is None and time.time() > a.message.deadline:
            return refuse(Refusal.EXPIRED, f"task deadline of round {header.round_id} passed")
        return verdict

    # -- chunks -------------------------------------------------------------------------
    def chunk(self, agent: str | None, payload: bytes) -> Decision:
        """Store one chunk of an announced blob; the final one yields the update."""
        if agent is None:
            return NOTHING
        try:
            chunk = decode_chunk(payload, max_payload=self.policy.max_chunk_bytes)
        except WireError as e:
            self.counters.malformed_chunks += 1
            log.info("malformed chunk from %s: %s", agent, e)
            return NOTHING
        key = (agent, chunk.hex_digest)
        with self._lock:
            header = self._incoming.get(key)
        if header is None:
            self._ignored(agent, chunk.hex_digest)
            return NOTHING
        try:
            blob = self.receiver.add(agent, chunk)
        except DigestMismatch as e:
            self._drop(key)
            return self._refuse(agent, refuse(Refusal.DIGEST_MISMATCH, str(e)), header)
        except WireError as e:  # the chunk alone: the update stays, the chunk is asked again
            self.counters.bad_chunks += 1
            log.info("refused a chunk of %s's update %s: %s", agent, chunk.hex_digest[:12], e)
            return NOTHING
        if blob is None:
            return NOTHING
        self._drop(key)
        return self._complete(agent, header, blob)

    def _ignored(self, agent: str, digest: str) -> None:
        """Count a chunk of no announced update; log the first of each digest."""
        self.counters.ignored_chunks += 1
        with self._lock:
            if digest in self._logged:
                return
            self._logged[digest] = None
            if len(self._logged) > LOGGED_DIGESTS:
                self._logged.popitem(last=False)
        log.info("dropped chunks of %s for %s: no update announced it", agent, digest[:12])

    def _drop(self, key: tuple[str, str]) -> None:
        self.receiver.discard(*key)
        with self._lock:
            self._incoming.pop(key, None)

    def _complete(self, agent: str, header: UpdateHeader, blob: bytes) -> Decision:
        a = self.dispatch.assignment(agent)
        if a is None or a.message.round_id != header.round_id:
            return self._refuse(
                agent, refuse(Refusal.STALE_ROUND, "round closed before it completed"), header
            )
        if a.message.secagg is not None:
            return self._complete_secure(agent, header, blob)
        bounds = self.state_bounds.get(header.prototype)
        verdict, delta = decode_update(
            header,
            blob,
            a.reference,
            bounds=self.policy.bounds,
            reference_norm=bounds.reference_norm if bounds is not None else None,
        )
        if delta is None:
            return self._refuse(agent, verdict, header)
        state = apply_delta(a.reference, delta)
        if bounds is not None:
            verdict = check_state(delta, state, a.reference, bounds)
            if not verdict.accepted:
                return self._refuse(agent, verdict, header)
        with self._lock:
            duplicate = (header.round_id, agent) in self._accepted
            if not duplicate:
                self._accepted.add((header.round_id, agent))
        if duplicate:
            return self._refuse(agent, refuse(Refusal.DUPLICATE, "already delivered"), header)
        metrics = dict(header.metrics) | {"upload_bytes": float(header.blob.size)}
        update = ClientUpdate(
            round_id=header.round_id,
            prototype=header.prototype,
            client_id=agent,
            num_samples=header.num_samples,
            state=state,
            metrics=metrics,
        )
        self.counters.accepted += 1
        ack = self._accept(agent, header)
        return Decision(agent=agent, verdict=verdict, ack=ack, update=update, header=header)

    def _complete_secure(self, agent: str, header: UpdateHeader, blob: bytes) -> Decision:
        """A masked input: handed to the secure round (folded into its sum there), then
        forgotten; acknowledged like an update, with no update for the engine."""
        if self.secure_input is None:
            verdict = refuse(Refusal.MALFORMED, "a masked input, and no secure round here")
        else:
            verdict = self.secure_input(agent, header, blob)
        if not verdict.accepted:
            return self._refuse(agent, verdict, header)
        with self._lock:
            self._accepted.add((header.round_id, agent))
        self.counters.accepted += 1
        ack = self._accept(agent, header)
        return Decision(agent=agent, verdict=verdict, ack=ack)

    # -- periodic -----------------------------------------------------------------------
    def new_round(self, round_id: int) -> None:
        """Forget accepted (round, agent) pairs of rounds before ``round_id``."""
        with self._lock:
            self._accepted = {k for k in self._accepted if k[0] >= round_id}

    def tick(self) -> tuple[list[Missing], list[Decision]]:
        """Chunk requests now due, and refusals of blobs that expired or went stale."""
        requests = self.receiver.due_requests()
        self.counters.chunk_requests_sent += len(requests)
        out = []
        for agent, digest in self.receiver.expire():
            with self._lock:
                header = self._incoming.pop((agent, digest), None)
            if header is not None:
                out.append(
                    self._refuse(
                        agent, refuse(Refusal.EXPIRED, "blob incomplete at timeout"), header
                    )
                )
        round_id = self.dispatch.current_round()
        with self._lock:
            stale = [(k, h) for k, h in self._incoming.items() if h.round_id < round_id]
        for key, header in stale:
            self._drop(key)
            out.append(self._refuse(key[0], refuse(Refusal.STALE_ROUND, "round closed"), header))
        return requests, out

    def delivered(self, round_id: int) -> set[str]:
        """Agents whose update of ``round_id`` was accepted."""
        with self._lock:
            return {agent for r, agent in self._accepted if r == round_id}

    def pending(self) -> int:
        """Update blobs announced and not yet complete."""
        with self._lock:
            return len(self._incoming)
