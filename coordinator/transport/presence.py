"""Presence: which provisioned agents have registered and are online. No broker: the
MQTT transport hands it received registrations and statuses and publishes the acks it
returns. :class:`PresenceGate` rate-limits both per agent before they are even queued.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from coordinator.transport.inbound import Inbound, agent_of, fresh
from coordinator.transport.versions import version_refusal
from takfl.mqtt.ratelimit import MessageLimiter, MessageLimits
from takfl.wire.freshness import ReplayGuard
from takfl.wire.messages import Ack, Registration, Status
from takfl.wire.signing import message_ref
from takfl.wire.topics import Topics
from takfl.wire.validation import AgentRecord, Refusal, Verdict, check_registration

log = logging.getLogger(__name__)


@dataclass
class AgentState:
    registration: Registration | None = None  # accepted registration
    online: bool = False


_RANK = {"online": 0, "offline": 1}  # within one connection, the will comes last


def status_order(msg: Status) -> tuple[float, int]:
    """Order of an agent's statuses: by connection start, then online before offline."""
    return (msg.time, _RANK[msg.state])


class PresenceGate:
    """Token buckets per agent on registrations and statuses (so on presence changes),
    checked on the network thread before a message is queued: a flood from one agent's
    topics is dropped unread, counted and logged once a window, and cannot fill the
    inbox every route shares. A topic that names no agent goes on (to be refused)."""

    def __init__(
        self,
        topics: Topics,
        registrations: MessageLimits,
        statuses: MessageLimits,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topics = topics
        self.registrations = MessageLimiter("registrations", registrations, clock=clock)
        self.statuses = MessageLimiter("statuses", statuses, clock=clock)

    def registration(self, topic: str) -> bool:
        agent = agent_of(self.topics, topic)
        return agent is None or self.registrations.allow(agent)

    def status(self, topic: str) -> bool:
        agent = agent_of(self.topics, topic)
        return agent is None or self.statuses.allow(agent)


class Presence:
    """Registered and online agents. Thread-safe; waiters are woken on every change."""

    def __init__(
        self,
        registry: dict[str, AgentRecord],
        *,
        on_allowance: Callable[[str, int], None] | None = None,
        guard: ReplayGuard | None = None,
    ) -> None:
        """``registry`` is shared with the other units: an agent's first accepted
        registration pins its sample allowance in it, and ``on_allowance(agent, n)``
        is called to persist it. ``guard`` refuses stale and replayed registrations."""
        self.registry = registry
        self.on_allowance = on_allowance
        self.guard = guard
        self._agents: dict[str, AgentState] = {a: AgentState() for a in registry}
        self._latest: dict[str, tuple[float, int]] = {}  # newest status order applied
        self._cond = threading.Condition()
        self.registrations = 0

    def register(self, received: Inbound[Registration]) -> tuple[Verdict, Ack | None]:
        """Check a registration; the verdict and the ack to send (None: nobody to answer,
        or a stale or replayed registration, which is never answered: an answer could be
        turned against the genuine sender). Another major version is answered
        ``unsupported_version`` when it is signed by the agent."""
        agent, msg = received.agent, received.message
        if agent is None:
            return received.verdict, None
        if received.other_version is not None:
            return received.verdict, version_refusal(agent, received.other_version, self.registry)
        verdict = received.verdict
        if msg is not None and verdict.accepted:
            verdict = check_registration(msg, self.registry)
            if verdict.accepted:
                verdict = fresh(self.guard, agent, msg)
                if not verdict.accepted:
                    return verdict, None
        ref = None if msg is None else message_ref(msg)
        if msg is None or not verdict.accepted:
            reason = verdict.reason or Refusal.MALFORMED
            ack = Ack(
                subject="register",
                agent_id=agent,
                run="" if msg is None else msg.run,
                digest=ref,
                accepted=False,
                reason=reason.value,
                detail=verdict.detail[:500],
            )
            return verdict, ack
        pinned = None
        with self._cond:
            self._agents[agent].registration = msg
            record = self.registry[agent]
            if record.max_samples is None:  # registered once: the first count is the cap
                self.registry[agent] = replace(record, max_samples=msg.num_samples)
                pinned = msg.num_samples
            self._cond.notify_all()
        if pinned is not None and self.on_allowance is not None:
            self.on_allowance(agent, pinned)
        self.registrations += 1
        return verdict, Ack(
            subject="register", agent_id=agent, run=msg.run, digest=ref, accepted=True
        )

    def status(self, received: Inbound[Status]) -> bool:
        """Apply an agent's signed presence unless an equal or newer one was applied (a
        replayed old status changes nothing); True if applied."""
        agent, msg = received.agent, received.message
        if not received.ok or agent is None or msg is None:
            log.warning("ignored status on %s's topic: %s", agent, received.verdict)
            return False
        order = status_order(msg)
        with self._cond:
            st = self._agents.get(agent)
            if st is None:
                return False
            latest = self._latest.get(agent)
            if latest is not None and order <= latest:
                log.info("ignored an old %s status of %s", msg.state, agent)
                return False
            self._latest[agent] = order
            st.online = msg.state == "online"
            self._cond.notify_all()
        return True

    def clients(self) -> dict[str, list[str]]:
        """Registered agents that are online, by prototype."""
        out: dict[str, list[str]] = {}
        with self._cond:
            for agent, st in sorted(self._agents.items()):
                if st.registration is not None and st.online:
                    out.setdefault(self.registry[agent].prototype, []).append(agent)
        return out

    def wait_for(self, agents: list[str], timeout: float) -> bool:
        """Wait until every agent in ``agents`` is registered and online."""

        def ready() -> bool:
            return all(
                (st := self._agents.get(a)) is not None
                and st.online
                and st.registration is not None
                for a in agents
            )

        with self._cond:
            return self._cond.wait_for(ready, timeout)

    def snapshot(self) -> dict[str, AgentState]:
        with self._cond:
            return {a: AgentState(s.registration, s.online) for a, s in self._agents.items()}
