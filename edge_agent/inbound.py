"""Reading a message the coordinator sent this agent: the one place where received bytes
become a trusted message or a refusal.

Every handler of the agent's MQTT end starts here. The payload is decoded strictly, must
verify under this agent's secret and be addressed to it (its ``agent_id``, which the
signature covers); a task must also be for the agent's prototype. With a
:class:`ReplayGuard` it must then be fresh: sent within the window, its nonce not seen
before (stale and replayed messages are never acted on). Of another major protocol
version only an ``unsupported_version`` refusal of a registration is read (its form is
the same in every version). The result is the message or a :class:`Verdict` saying why
not; nothing raises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from takfl.wire.errors import UnsupportedVersion, WireError
from takfl.wire.freshness import ReplayGuard
from takfl.wire.messages import Ack, SignedMessage, TaskMessage, decode_message
from takfl.wire.messages import decode_version_refusal as version_refusal
from takfl.wire.signing import verify
from takfl.wire.validation import Refusal, Verdict, refuse

log = logging.getLogger(__name__)
M = TypeVar("M", bound=SignedMessage)
COORDINATOR = "coordinator"  # the sender of everything an agent reads


@dataclass(frozen=True)
class Inbound(Generic[M]):
    """A received message and whether it may be acted on."""

    decoded: M | None  # as decoded (None if undecodable); trusted only when ``ok``
    verdict: Verdict

    @property
    def ok(self) -> bool:
        return self.decoded is not None and self.verdict.accepted

    @property
    def message(self) -> M | None:
        """The message when it may be acted on, else None."""
        return self.decoded if self.ok else None

    @property
    def malformed(self) -> bool:
        """True when the payload did not even decode."""
        return self.decoded is None


def _decode(cls: type[M], payload: bytes) -> M:
    """``payload`` as ``cls``; an ack of another major version only if it is a version
    refusal. Raises WireError otherwise."""
    try:
        return decode_message(cls, payload)
    except UnsupportedVersion as e:
        if cls is not Ack:
            raise
        return version_refusal(e.received)  # type: ignore[return-value]


def read(
    cls: type[M],
    payload: bytes,
    *,
    agent_id: str,
    secret: bytes,
    prototype: str | None = None,
    guard: ReplayGuard | None = None,
) -> Inbound[M]:
    """Decode ``payload`` as ``cls`` sent to agent ``agent_id``.

    Checks, in order: the payload decodes (else ``malformed``, or
    ``unsupported_version``); it verifies under ``secret`` (``bad_signature``); its
    ``agent_id`` is ``agent_id`` (``bad_signature``: not signed for this agent); with
    ``prototype``, its ``prototype`` is that one (``wrong_prototype``); with ``guard``, it
    is fresh (``stale_message``, ``replayed``).
    """
    try:
        msg = _decode(cls, payload)
    except UnsupportedVersion as e:
        return Inbound(None, refuse(Refusal.UNSUPPORTED_VERSION, str(e)))
    except WireError as e:
        return Inbound(None, refuse(Refusal.MALFORMED, str(e)))
    if not verify(msg, secret):
        return Inbound(msg, refuse(Refusal.BAD_SIGNATURE, f"{cls.__name__} not signed for it"))
    claimed = getattr(msg, "agent_id", None)
    if claimed != agent_id:
        return Inbound(
            msg, refuse(Refusal.BAD_SIGNATURE, f"{cls.__name__} addressed to {claimed!r}")
        )
    if prototype is not None and getattr(msg, "prototype", None) != prototype:
        return Inbound(
            msg, refuse(Refusal.WRONG_PROTOTYPE, f"{cls.__name__} for another prototype")
        )
    if guard is not None:
        verdict = guard.check(COORDINATOR, msg.sent_at, msg.nonce)
        if not verdict.accepted:
            return Inbound(msg, verdict)
    return Inbound(msg, Verdict())


class InboundReader:
    """Reads every message addressed to one agent (its id, secret and prototype), fresh
    ones only; counts and logs the control messages it ignores. Used from the link's
    dispatcher thread."""

    def __init__(
        self, agent_id: str, secret: bytes, prototype: str, guard: ReplayGuard | None = None
    ) -> None:
        self.agent_id = agent_id
        self.secret = secret
        self.prototype = prototype
        self.guard = guard if guard is not None else ReplayGuard()
        self.unauthenticated = 0  # control messages that decoded but are not signed for it
        self.stale = 0  # signed for it, but stale or replayed

    def task(self, payload: bytes) -> Inbound[TaskMessage]:
        """A task, which must also be for this agent's prototype (judged by the intake)."""
        return read(
            TaskMessage,
            payload,
            agent_id=self.agent_id,
            secret=self.secret,
            prototype=self.prototype,
            guard=self.guard,
        )

    def control(
        self,
        cls: type[M],
        payload: bytes,
        what: str,
        label: Callable[[M], str] | None = None,
        *,
        fresh: bool = True,
    ) -> M | None:
        """An ack, chunk request or announcement if it is signed for this agent (and, with
        ``fresh``, not stale or replayed), else None: logged as malformed, or counted and
        logged as unauthenticated or stale (``what`` names it in the log; ``label``, given
        the untrusted message, names it in the latter)."""
        received = read(
            cls,
            payload,
            agent_id=self.agent_id,
            secret=self.secret,
            guard=self.guard if fresh else None,
        )
        if received.ok:
            return received.message
        if received.decoded is None:
            log.warning("%s: malformed %s: %s", self.agent_id, what, received.verdict.detail)
            return None
        name = what if label is None else label(received.decoded)
        if received.verdict.reason in (Refusal.STALE_MESSAGE, Refusal.REPLAYED):
            self.stale += 1
            log.warning("%s: ignored a %s: %s", self.agent_id, name, received.verdict)
        else:
            self.unauthenticated += 1
            log.warning("%s: ignored an unauthenticated %s", self.agent_id, name)
        return None
