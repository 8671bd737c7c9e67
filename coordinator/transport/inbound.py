"""Reading a message an agent published: the one place where received bytes become a
typed message or a refusal.

Every handler of the coordinator's MQTT end starts here: the topic names the agent
(the broker's ACL lets an agent write only under its own ``up/`` tree), the payload is
decoded strictly, its ``agent_id`` must be the topic's, and a signed message must verify
under that agent's provisioned secret; with a :class:`ReplayGuard`, it must also be fresh
(sent within the window, its nonce not seen before). The result is the message or a
:class:`Verdict` saying why not; nothing raises. A message of another major protocol
version is refused ``unsupported_version`` and keeps the object received, so its sender
can be told (:meth:`Presence.register`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from takfl.wire.errors import UnsupportedVersion, WireError
from takfl.wire.freshness import ReplayGuard
from takfl.wire.messages import SignedMessage, decode_message
from takfl.wire.signing import verify
from takfl.wire.topics import Topics
from takfl.wire.validation import AgentRecord, Refusal, Verdict, refuse

M = TypeVar("M", bound=SignedMessage)


@dataclass(frozen=True, kw_only=True)
class Inbound(Generic[M]):
    """A received message, or why it cannot be used (``message`` None)."""

    agent: str | None  # from the topic; None when the topic names no agent
    message: M | None
    verdict: Verdict
    other_version: dict[str, Any] | None = None  # the object of another major version

    @property
    def ok(self) -> bool:
        return self.message is not None and self.verdict.accepted


def agent_of(topics: Topics, topic: str) -> str | None:
    """The agent id a topic belongs to, or None."""
    try:
        return topics.agent_of(topic)
    except WireError:
        return None


def fresh(guard: ReplayGuard | None, agent: str, msg: SignedMessage) -> Verdict:
    """The guard's verdict on ``msg`` from ``agent`` (accepted when there is no guard)."""
    return Verdict() if guard is None else guard.check(agent, msg.sent_at, msg.nonce)


def refused(agent: str | None, verdict: Verdict) -> Inbound[Any]:
    """A message from ``agent`` that cannot be used, and why."""
    return Inbound(agent=agent, message=None, verdict=verdict)


def read(
    cls: type[M],
    topics: Topics,
    topic: str,
    payload: bytes,
    registry: Mapping[str, AgentRecord],
    *,
    authenticate: bool = True,
    guard: ReplayGuard | None = None,
) -> Inbound[M]:
    """Decode ``payload`` as ``cls`` from the agent of ``topic``.

    Checks, in order: the topic names an agent; the payload decodes (another major
    version: ``unsupported_version``); the message's ``agent_id`` (when it has one) is
    that agent; with ``authenticate``, the agent is provisioned and the message verifies
    under its secret, and then with ``guard`` it is fresh (``stale_message``,
    ``replayed``).
    """
    agent = agent_of(topics, topic)
    if agent is None:
        verdict = refuse(Refusal.MALFORMED, f"{topic!r} names no agent")
        return Inbound(agent=None, message=None, verdict=verdict)
    try:
        msg = decode_message(cls, payload)
    except UnsupportedVersion as e:
        verdict = refuse(Refusal.UNSUPPORTED_VERSION, str(e))
        return Inbound(agent=agent, message=None, verdict=verdict, other_version=e.received)
    except WireError as e:
        return refused(agent, refuse(Refusal.MALFORMED, str(e)))
    claimed = getattr(msg, "agent_id", agent)
    if claimed != agent:
        detail = f"{cls.__name__} of {claimed!r} on {agent!r}"
        return refused(agent, refuse(Refusal.MALFORMED, detail))
    if authenticate:
        record = registry.get(agent)
        if record is None:
            detail = f"agent {agent!r} is not provisioned"
            return refused(agent, refuse(Refusal.UNKNOWN_AGENT, detail))
        if not verify(msg, record.secret):
            return refused(agent, refuse(Refusal.BAD_SIGNATURE, f"{cls.__name__} of {agent!r}"))
        verdict = fresh(guard, agent, msg)
        if not verdict.accepted:
            return refused(agent, verdict)
    return Inbound(agent=agent, message=msg, verdict=Verdict())
