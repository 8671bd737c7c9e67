"""The agent's end of the release protocol, attachable to any holder of an MQTT client.

    channel = ReleaseChannel(installer, agent_id=me, secret=secret, fleet=fleet,
                             publish=client.publish)
    client.route(channel.offer_topic, channel.on_offer)        # down/<me>/release
    # in the handler of down/<me>/chunk, before anything else looks at the chunk:
    if channel.on_chunk(decode_chunk(payload)): return
    client.every_tick(channel.tick)

An offer must be signed with this agent's secret, addressed to it and fresh (sent within
the replay window, its nonce not seen before; the release service re-offers with a fresh
stamp); the :class:`~edge_agent.deploy.installer.Installer` judges it. Reports and
chunk requests carry the run of the latest offer (the release service's). The
artifacts it asks for are expected in the channel's own :class:`BlobReceiver` (sizes
from the *signed* lengths) and requested with signed :class:`ChunkRequest` s on
``up/<me>/request``; the coordinator answers on ``down/<me>/chunk``. Missing chunks are
asked for again after ``quiet_s``; an artifact with no progress for
``limits.timeout_s``, or whose chunks do not reassemble to its signed SHA-256, fails the
install. Installs run on a worker thread; their reports are published from
:meth:`tick`. Every report is signed and goes to ``up/<me>/release``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_agent.deploy.decision import NOTHING, Decision, InstallJob
from edge_agent.deploy.installer import Installer
from takfl.mqtt.blobs import REQUEST_BATCH, BlobReceiver
from takfl.release.metadata import ReleaseRefusal, ReleaseRefused
from takfl.wire.chunking import ReassemblyLimits
from takfl.wire.errors import WireError
from takfl.wire.freshness import ReplayGuard
from takfl.wire.messages import Chunk, ChunkRequest, decode_message, encode_message
from takfl.wire.release import ReleaseOffer
from takfl.wire.signing import sign, verify
from takfl.wire.topics import Down, Topics, Up, check_ident

log = logging.getLogger(__name__)

SOURCE = "coordinator"  # blob source of release artifacts
Publish = Callable[[str, bytes], object]


@dataclass(frozen=True, kw_only=True)
class ChannelPolicy:
    quiet_s: float = 5.0  # ask again for missing artifact chunks after this long
    limits: ReassemblyLimits = field(  # the model and its reference file
        default_factory=lambda: ReassemblyLimits(
            max_blob_bytes=1024**3, max_pending=2, max_pending_bytes=1024**3, timeout_s=120.0
        )
    )


@dataclass(kw_only=True)
class ChannelCounters:
    offers: int = 0
    bad_offers: int = 0  # undecodable
    unauthenticated: int = 0  # not signed with this agent's secret or not addressed to it
    stale: int = 0  # signed for it but outside the replay window, or replayed
    chunk_requests: int = 0
    bad_chunks: int = 0  # chunks of an expected artifact that did not fit it
    reports: int = 0


class ReleaseChannel:
    """Routes release offers and artifact chunks to an installer; publishes its reports."""

    def __init__(
        self,
        installer: Installer,
        *,
        agent_id: str,
        secret: bytes,
        fleet: str,
        publish: Publish,
        policy: ChannelPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.installer = installer
        self.agent_id = check_ident(agent_id, "agent id")
        self._secret = secret
        self.topics = Topics(fleet)
        self.publish = publish
        self.policy = policy or ChannelPolicy()
        self.clock = clock
        self.counters = ChannelCounters()
        self.receiver = BlobReceiver(
            self.policy.limits,
            quiet_s=self.policy.quiet_s,
            max_total_bytes=self.policy.limits.max_pending_bytes,
            clock=clock,
        )
        self._done: queue.Queue[Decision] = queue.Queue()
        self._worker: threading.Thread | None = None
        self.guard = ReplayGuard()
        self.run = ""  # the release service's run, from its latest offer

    @property
    def offer_topic(self) -> str:
        """``down/<me>/release``: route it to :meth:`on_offer`."""
        return self.topics.down(self.agent_id, Down.RELEASE)

    # -- inputs (dispatcher thread) -------------------------------------------------------
    def on_offer(self, _topic: str, payload: bytes) -> None:
        """A message on ``down/<me>/release``."""
        try:
            offer = decode_message(ReleaseOffer, payload)
        except WireError as e:
            self.counters.bad_offers += 1
            log.warning("%s: malformed release offer: %s", self.agent_id, e)
            return
        if not verify(offer, self._secret) or offer.agent_id != self.agent_id:
            self.counters.unauthenticated += 1
            log.warning("%s: ignored a release offer not signed for it", self.agent_id)
            return
        fresh = self.guard.check(SOURCE, offer.sent_at, offer.nonce)
        if not fresh.accepted:
            self.counters.stale += 1
            log.warning("%s: ignored a release offer: %s", self.agent_id, fresh)
            return
        self.counters.offers += 1
        self.run = offer.run
        log.info("%s: offered release %d (%s)", self.agent_id, offer.version, offer.action)
        self._apply(self.installer.offer(offer))

    def on_chunk(self, chunk: Chunk) -> bool:
        """Take ``chunk`` if it belongs to an artifact being fetched; True if it did (the
        caller then ignores it), False if it is someone else's."""
        digest = chunk.hex_digest
        if not self.receiver.is_pending(SOURCE, digest):
            return False
        try:
            blob = self.receiver.add(SOURCE, chunk)
        except WireError as e:
            self.counters.bad_chunks += 1
            if not self.receiver.is_pending(SOURCE, digest):  # the receiver dropped it
                refusal = ReleaseRefused(ReleaseRefusal.BAD_ARTIFACT, f"artifact {digest}: {e}")
                self._apply(self.installer.blob_failed(digest, refusal))
            else:
                log.warning("%s: refused an artifact chunk: %s", self.agent_id, e)
            return True
        if blob is not None:
            self._apply(self.installer.blob(digest, blob))
        return True

    def tick(self) -> None:
        """Ask again for missing chunks, time out stalled artifacts, publish the results of
        finished installs, judge an offer that waited for one."""
        for m in self.receiver.due_requests():
            self._request(m.digest, m.indices)
        for _source, digest in self.receiver.expire():
            limit = self.policy.limits.timeout_s
            refusal = ReleaseRefused(
                ReleaseRefusal.DOWNLOAD_FAILED, f"no chunk of artifact {digest} for {limit:g} s"
            )
            self._apply(self.installer.blob_failed(digest, refusal))
        worker = self._worker
        if worker is not None and not worker.is_alive():
            self._worker = None
            while not self._done.empty():
                self._apply(self._done.get_nowait())
        if self._worker is None:
            self._apply(self.installer.tick())

    # -- outputs --------------------------------------------------------------------------
    def _apply(self, decision: Decision) -> None:
        for digest in decision.drop:
            self.receiver.discard(SOURCE, digest)
        refused = NOTHING
        for ref in decision.fetch:
            try:
                self.receiver.expect(SOURCE, ref)
            except WireError as e:
                why = ReleaseRefused(ReleaseRefusal.INCOMPATIBLE, f"artifact {ref.digest}: {e}")
                refused += self.installer.blob_failed(ref.digest, why)
                continue
            missing = self.receiver.missing(SOURCE, ref.digest)
            for start in range(0, len(missing), REQUEST_BATCH):
                self._request(ref.digest, missing[start : start + REQUEST_BATCH])
        for report in decision.reports:
            signed = sign(report, self._secret)
            self.publish(self.topics.up(self.agent_id, Up.RELEASE), encode_message(signed))
            self.counters.reports += 1
        if decision.job is not None:
            self._start(decision.job)
        if refused != NOTHING:
            self._apply(refused)

    def _request(self, digest: str, indices: list[int]) -> None:
        request = sign(
            ChunkRequest(run=self.run, agent_id=self.agent_id, digest=digest, missing=indices),
            self._secret,
        )
        self.publish(self.topics.up(self.agent_id, Up.REQUEST), encode_message(request))
        self.counters.chunk_requests += 1

    def _start(self, job: InstallJob) -> None:
        def work() -> None:
            self._done.put(self.installer.install(job))

        self._worker = threading.Thread(target=work, name="release-install", daemon=True)
        self._worker.start()

    def wait_idle(self, timeout: float) -> bool:
        """Wait for a running install to end (its report goes out on the next tick)."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
        return worker is None or not worker.is_alive()
