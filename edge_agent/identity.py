"""Who an agent is, as provisioned on the coordinator, and the signed messages in which it
says so: its registration and its presence status."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from takfl.config.profile import HardwareClass
from takfl.wire.messages import InferenceStatus, Registration, Status, encode_message
from takfl.wire.signing import sign
from takfl.wire.telemetry import Telemetry


@dataclass(frozen=True, kw_only=True)
class AgentIdentity:
    """Who this agent is, as provisioned on the coordinator."""

    agent_id: str
    prototype: str
    secret: bytes = field(repr=False)
    profile: str = "custom"
    hardware_class: HardwareClass = "raspberry-pi"
    num_samples: int = 0

    def registration(
        self, sent_at: float, telemetry: Telemetry | None, run: str = ""
    ) -> Registration:
        """The registration sent at ``sent_at`` (unix time), signed with the secret;
        ``run``: the coordinator's run this agent last saw ("" before any)."""
        reg = Registration(
            run=run,
            agent_id=self.agent_id,
            prototype=self.prototype,
            profile=self.profile,
            hardware_class=self.hardware_class,
            num_samples=self.num_samples,
            sent_at=sent_at,
            telemetry=telemetry,
        )
        return sign(reg, self.secret)

    def status(
        self,
        state: Literal["online", "offline"],
        connected_at: float,
        inference: InferenceStatus | None = None,
        *,
        run: str = "",
        sent_at: float | None = None,
    ) -> bytes:
        """The encoded, signed status of the connection that started at ``connected_at``
        (with the local inference service's block, when the agent serves a model), sent
        at ``sent_at`` (default now; a will: the connection's start); ``run``: the
        coordinator's run this agent last saw."""
        msg = Status(
            agent_id=self.agent_id,
            prototype=self.prototype,
            state=state,
            time=connected_at,
            inference=inference,
            run=run,
            sent_at=time.time() if sent_at is None else sent_at,
        )
        return encode_message(sign(msg, self.secret))
