"""How an agent's link behaves (:class:`LinkPolicy`) and what it counted (:class:`LinkCounters`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_agent.intake import IntakePolicy
from takfl.mqtt.ratelimit import ResendLimits
from takfl.wire.chunking import ReassemblyLimits


@dataclass(frozen=True, kw_only=True)
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

    def intake(self) -> IntakePolicy:
        return IntakePolicy(limits=self.limits, quiet_s=self.quiet_s, programs=self.programs)


@dataclass(kw_only=True)
class LinkCounters:
    tasks: int = 0
    bad_tasks: int = 0  # undecodable, badly signed or not for this agent
    blob_errors: int = 0  # chunks refused, digests failed, undecodable blobs
    ignored_chunks: int = 0  # chunks of no expected blob
    requests_answered: int = 0
    header_retries: int = 0
    unauthenticated: int = 0  # acks, requests, announcements not signed for this agent
    stale: int = 0  # signed for it, but outside the replay window or replayed
    other_run: int = 0  # acks, requests, announcements of another run, ignored
