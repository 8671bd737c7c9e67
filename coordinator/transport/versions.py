"""Answering an agent of another major protocol version: the one message both sides
read across majors is the ``unsupported_version`` refusal of a registration (protocol
1.0's ``ack`` form, frozen). No broker: :class:`Presence` returns it, the transport
publishes it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from takfl.wire.messages import Ack
from takfl.wire.signing import object_ref, verify_object
from takfl.wire.validation import AgentRecord, Refusal
from takfl.wire.version import current

_RUN = re.compile(r"[0-9a-f]{32}")


def speaks() -> str:
    """What the detail of a version refusal says this coordinator speaks."""
    major = current().split(".")[0]
    return f"this coordinator speaks protocol {current()} (and reads any {major}.x)"


def version_refusal(
    agent: str, received: dict[str, Any], registry: Mapping[str, AgentRecord]
) -> Ack | None:
    """The refusal of a registration of another major version from ``agent`` (its JSON
    object as received), or None when it cannot be answered: not a registration of that
    provisioned agent, or not signed with its secret (an answer would tell nobody)."""
    record = registry.get(agent)
    if (
        record is None
        or received.get("kind") != "register"
        or received.get("agent_id") != agent
        or not verify_object(received, record.secret)
    ):
        return None
    run = received.get("run")
    return Ack(
        subject="register",
        agent_id=agent,
        run=run if isinstance(run, str) and _RUN.fullmatch(run) else "",
        digest=object_ref(received),
        accepted=False,
        reason=Refusal.UNSUPPORTED_VERSION.value,
        detail=f"agent speaks protocol {str(received.get('protocol'))[:16]}; {speaks()}",
    )
