"""The release desk: device reports in, signed offers and decisions out. No broker.

:class:`ReleaseControl` drives the rollouts of one release command
(:mod:`coordinator.deploy.rollout`): it starts them, applies authenticated
``ReleaseReport`` s, times devices out, re-sends unanswered offers, has a rollback
release made when a rollout halts, signs every offer with the addressed agent's
secret, says which blobs an agent may fetch, and saves the records after every
transition. Each call returns a :class:`Decision`; the MQTT service
(:mod:`coordinator.deploy.service`) publishes it. A release command is a run of its own:
every offer carries the desk's ``run_id`` and a report of another run is ignored
(``other_run``). Thread-safe: the service calls it
from its dispatcher thread and, at the end, from the thread that runs it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from coordinator.deploy.publish import Published
from coordinator.deploy.rollout import Offer, Rollout, Step
from coordinator.transport.inbound import Inbound
from takfl.wire.envelope import new_run_id
from takfl.wire.release import ReleaseOffer, ReleaseReport
from takfl.wire.signing import sign
from takfl.wire.validation import AgentRecord

log = logging.getLogger(__name__)


class ReleaseSource(Protocol):
    """Where the desk gets releases: those published for this command, stored ones,
    and rollback releases made when a rollout halts."""

    def published(self, prototype: str, version: int) -> Published: ...

    def make_rollback(self, prototype: str, to_version: int) -> Published: ...


@dataclass
class Decision:
    """What to publish: offers (agent, signed offer), after keeping the blobs of
    ``keep`` for chunk requests; ``lines``: progress for the operator."""

    offers: list[tuple[str, ReleaseOffer]] = field(default_factory=list)
    keep: list[Published] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


class ReleaseControl:
    """Drives ``rollouts`` (see the module docstring). ``save`` persists the records;
    ``clock`` gives unix seconds."""

    def __init__(
        self,
        registry: Mapping[str, AgentRecord],
        rollouts: Sequence[Rollout],
        source: ReleaseSource,
        *,
        save: Callable[[], None],
        offer_retry_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        run_id: str | None = None,
    ) -> None:
        """``run_id``: this command's run (None: a fresh one)."""
        self.registry = registry
        self.rollouts = {r.id: r for r in rollouts}
        self.source = source
        self.save = save
        self.offer_retry_s = offer_retry_s
        self.clock = clock
        self.run_id = run_id if run_id is not None else new_run_id()
        self.ignored = 0  # reports that matched no rollout or device, or of another run
        self._fetchable: dict[str, set[str]] = {}  # agent -> digests of releases offered it
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        """True when every rollout has finished (completed, halted, rolled back)."""
        with self._lock:
            return all(r.finished for r in self.rollouts.values())

    # -- calls ----------------------------------------------------------------------------
    def start(self) -> Decision:
        """Offer every rollout's first stage."""
        with self._lock:
            now = self.clock()
            return self._apply([(r, r.start(now)) for r in self.rollouts.values()], now)

    def report(self, received: Inbound[ReleaseReport]) -> Decision:
        """Apply a device's report (ignored unless authenticated and of a running rollout
        that offered that device something)."""
        msg, agent = received.message, received.agent
        if not received.ok or msg is None or agent is None:
            log.info("ignored release report from %s: %s", agent, received.verdict)
            return Decision()
        with self._lock:
            rollout = self.rollouts.get(msg.rollout)
            if msg.run != self.run_id:
                self.ignored += 1
                log.info("ignored release report of %s of another run %r", agent, msg.run)
                return Decision()
            if rollout is None or agent not in rollout.devices:
                self.ignored += 1
                log.info("ignored release report of %s about rollout %s", agent, msg.rollout)
                return Decision()
            now = self.clock()
            return self._apply([(rollout, rollout.report(agent, msg, now))], now)

    def tick(self) -> Decision:
        """Per-device timeouts and re-sent offers."""
        with self._lock:
            now = self.clock()
            steps = []
            for r in self.rollouts.values():
                if not r.finished:
                    step = r.tick(now)
                    step.offers += r.resends(now, self.offer_retry_s)
                    steps.append((r, step))
            return self._apply(steps, now)

    def stop(self, reason: str) -> Decision:
        """End every unfinished rollout where it stands."""
        with self._lock:
            now = self.clock()
            return self._apply([(r, r.stop(reason, now)) for r in self.rollouts.values()], now)

    def may_fetch(self, agent: str, digest: str) -> bool:
        """An agent may fetch only the blobs of releases offered to it."""
        with self._lock:
            return digest in self._fetchable.get(agent, set())

    # -- internals --------------------------------------------------------------------------
    def _apply(self, steps: list[tuple[Rollout, Step]], now: float) -> Decision:
        decision = Decision()
        changed = False
        for rollout, step in steps:
            if step.needs_rollback:
                step.merge(self._roll_back(rollout, now))
            changed = changed or step.changed
            decision.lines += step.events
            for offer in step.offers:
                self._offer(rollout, offer, decision)
        if changed:
            self.save()
        return decision

    def _roll_back(self, rollout: Rollout, now: float) -> Step:
        previous = rollout.previous
        if previous is None:  # the machine asks only when there is one
            return Step()
        try:
            made = self.source.make_rollback(rollout.prototype, previous)
        except (OSError, ValueError) as e:  # store, key or metadata problems
            log.exception("cannot make the rollback release of %s", rollout.id)
            return rollout.abandon_rollback(str(e), now)
        step = rollout.begin_rollback(made.version, now)
        step.events.insert(0, f"{rollout.id}: rollback release {made.version} signed")
        return step

    def _offer(self, rollout: Rollout, offer: Offer, decision: Decision) -> None:
        record = self.registry.get(offer.agent)
        if record is None:  # rollouts are planned over the registry; cannot happen
            log.warning("%s: no secret for %s; offer not sent", rollout.id, offer.agent)
            return
        published = self.source.published(rollout.prototype, offer.version)
        if all(kept is not published for kept in decision.keep):
            decision.keep.append(published)
        self._fetchable.setdefault(offer.agent, set()).update(published.blobs)
        message = ReleaseOffer(
            run=self.run_id,
            agent_id=offer.agent,
            prototype=rollout.prototype,
            rollout=rollout.id,
            action=offer.action,
            version=offer.version,
            metadata=published.release.raw.decode(),
            chunk_size=published.chunk_size,
            sent_at=time.time(),
        )
        decision.offers.append((offer.agent, sign(message, record.secret)))
