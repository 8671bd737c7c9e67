"""Task acks and chunk requests from agents: which ones the coordinator acts on. No broker:
the MQTT transport reads each message (signature, freshness) and asks this desk.

A task ack or chunk request is acted on only when it is authenticated, fresh and of the
coordinator's run; a chunk request only for a blob of the agent's current task (a release
service answers for its own blobs). What is not acted on is counted by reason and
logged (another run: once per run).
"""

from __future__ import annotations

import logging
from collections import Counter

from coordinator.transport.dispatch import TaskDispatch
from coordinator.transport.inbound import Inbound
from takfl.wire.messages import Ack, ChunkRequest
from takfl.wire.validation import Refusal, Verdict, refuse

log = logging.getLogger(__name__)


class ControlDesk:
    """Judges task acks and chunk requests of the run of ``dispatch``."""

    def __init__(self, dispatch: TaskDispatch) -> None:
        self.dispatch = dispatch
        self.ignored: Counter[str] = Counter()  # by Refusal value
        self._other_runs: set[str] = set()  # runs already logged

    def task_ack(self, received: Inbound[Ack]) -> bool:
        """Note an agent's ack of its task; True if it was acted on."""
        ack, agent = received.message, received.agent
        if not received.ok or agent is None or ack is None:
            self._ignore("task ack", agent, received.verdict)
            return False
        if ack.run != self.dispatch.run:
            self._ignore("task ack", agent, self._other_run(ack.run))
            return False
        if not ack.accepted:
            log.warning("agent %s refused its task: %s %s", agent, ack.reason, ack.detail)
        return self.dispatch.acknowledged(agent, ack)

    def chunk_request(self, received: Inbound[ChunkRequest]) -> ChunkRequest | None:
        """The request to answer (chunks of the agent's current task), or None."""
        request, agent = received.message, received.agent
        if not received.ok or agent is None or request is None:
            self._ignore("chunk request", agent, received.verdict)
            return None
        if not self.dispatch.may_fetch(agent, request.digest):
            return None  # not this run's blob (a release service answers for its own)
        if request.run != self.dispatch.run:
            self._ignore("chunk request", agent, self._other_run(request.run))
            return None
        return request

    def _other_run(self, run: str) -> Verdict:
        return refuse(Refusal.OTHER_RUN, run)

    def _ignore(self, what: str, agent: str | None, verdict: Verdict) -> None:
        reason = verdict.reason or Refusal.MALFORMED
        self.ignored[reason.value] += 1
        if reason is Refusal.OTHER_RUN:
            if verdict.detail in self._other_runs:
                return
            self._other_runs.add(verdict.detail)
            log.info("ignoring %ss of another run (%s), e.g. from %s", what, verdict.detail, agent)
            return
        log.info("ignored %s of %s: %s", what, agent, verdict)
