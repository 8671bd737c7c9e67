"""Reading a message an agent published: the one place where received bytes become a
typed message or a refusal.

Every handler of the coordinator's MQTT end starts here: the topic names the agent
(the broker's ACL lets an agent write only under its own ``up/`` tree), the payload is
decoded strictly, its ``agent_id`` must be the topic's, and a signed message must verify
under that agent's provisioned secret. The result is the message or a :class:`Verdict`
saying why not; nothing raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from takfl.wire.errors import WireError
from takfl.wire.messages import SignedMessage, WireMessage, decode_message
from takfl.wire.signing import verify
from takfl.wire.topics import Topics
from takfl.wire.validation import AgentRecord, Refusal, Verdict, refuse

M = TypeVar("M", bound=WireMessage)


@dataclass(frozen=True)
class Inbound(Generic[M]):
    """A received message, or why it cannot be used (``message`` None)."""

    agent: str | None  # from the topic; None when the topic names no agent
    message: M | None
    verdict: Verdict

    @property
    def ok(self) -> bool:
        return self.message is not None and self.verdict.accepted


def agent_of(topics: Topics, topic: str) -> str | None:
    """The agent id a topic belongs to, or None."""
    try:
        return topics.agent_of(topic)
    except WireError:
        return None


def read(
    cls: type[M],
    topics: Topics,
    topic: str,
    payload: bytes,
    registry: Mapping[str, AgentRecord],
    *,
    authenticate: bool = True,
) -> Inbound[M]:
    """Decode ``payload`` as ``cls`` from the agent of ``topic``.

    Checks, in order: the topic names an agent; the payload decodes; the message's
    ``agent_id`` (when it has one) is that agent; with ``authenticate``, the agent is
    provisioned and a signed message verifies under its secret.
    """
    agent = agent_of(topics, topic)
    if agent is None:
        return Inbound(None, None, refuse(Refusal.MALFORMED, f"{topic!r} names no agent"))
    try:
        msg = decode_message(cls, payload)
    except WireError as e:
        return Inbound(agent, None, refuse(Refusal.MALFORMED, str(e)))
    claimed = getattr(msg, "agent_id", agent)
    if claimed != agent:
        return Inbound(
            agent, None, refuse(Refusal.MALFORMED, f"{cls.__name__} of {claimed!r} on {agent!r}")
        )
    if authenticate:
        record = registry.get(agent)
        if record is None:
            return Inbound(
                agent, None, refuse(Refusal.UNKNOWN_AGENT, f"agent {agent!r} is not provisioned")
            )
        if isinstance(msg, SignedMessage) and not verify(msg, record.secret):
            return Inbound(
                agent, None, refuse(Refusal.BAD_SIGNATURE, f"{cls.__name__} of {agent!r}")
            )
    return Inbound(agent, msg, Verdict())
