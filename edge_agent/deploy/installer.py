"""Release installs on the device: offers and artifacts in, decisions out. No broker.

An authenticated :class:`ReleaseOffer` is judged in a fixed order: the metadata
(:func:`verify_release`: signature against the fleet's root, expiry, version against
``trusted.json``, fleet and prototype; ``trusted.json`` then moves forward, so replayed
older metadata stays refused even if this install fails), compatibility with the device
profile (runtime and format, runtime importable here, model size within
``inference.memory_limit_mb``), then the staging slot is prepared (artifacts already
held are reused) and free disk is checked for what must still be fetched. Each artifact
that arrives is checked against its signed length and SHA-256 before it is written.
When all are there, :meth:`Installer.install` (on a worker thread: it loads the model
and times it) loads the model in the profile's runtime, runs the health check, switches
the slot and hands the new model to the inference service. Every step returns a
:class:`Decision`: the reports to publish (downloading, verifying, installed | failed
with a :class:`ReleaseRefusal` reason), the blobs to fetch or drop, the install to run.
Whatever fails, the model being served stays as it was.

``offer``, ``blob``, ``blob_failed`` and ``tick`` run on one thread (the MQTT
dispatcher); ``install`` on a worker; an offer that arrives during an install is judged
once the install is over (the newest one only).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tuf.api.metadata import Root

from edge_agent.deploy.checks import (
    MB,
    check_compatible,
    free_bytes,
    model_file_name,
    storage_refusal,
)
from edge_agent.deploy.decision import NOTHING, Decision, InstallJob
from edge_agent.deploy.health import Health, check_health
from edge_agent.deploy.slots import REFERENCE_FILE, SlotError, SlotRecord, SlotStore
from edge_agent.serving.model import ModelHolder, ServedModel
from export.runtimes import load_artifact
from takfl.config.profile import DeviceProfile
from takfl.release.metadata import (
    Artifact,
    Release,
    ReleaseRefusal,
    ReleaseRefused,
    check_artifact,
    verify_release,
)
from takfl.wire.messages import BlobRef, chunk_count
from takfl.wire.release import ReleaseOffer, ReleaseReport, ReleaseState

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class InstallPolicy:
    download_timeout_s: float = 900.0  # from the offer to the last artifact
    disk_margin_bytes: int = 16 * MB  # free disk kept beyond the artifacts to fetch
    health_iters: int = 50  # batch-1 runs timed by the health check


@dataclass(kw_only=True)
class InstallerCounters:
    offers: int = 0
    installed: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # by ReleaseRefusal value


@dataclass(kw_only=True)
class _Download:
    offer: ReleaseOffer
    release: Release
    record: SlotRecord
    pending: dict[str, tuple[Artifact, str]]  # sha256 -> (artifact, file name in the slot)
    received_at: float


class Installer:
    """Installs the releases of one device (see the module docstring)."""

    def __init__(
        self,
        store: SlotStore,
        root: Root,
        *,
        agent_id: str,
        fleet: str,
        profile: DeviceProfile,
        holder: ModelHolder,
        policy: InstallPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        disk_free: Callable[[Path], int] = free_bytes,
    ) -> None:
        self.store = store
        self.root = root
        self.agent_id = agent_id
        self.fleet = fleet
        self.profile = profile
        self.holder = holder
        self.policy = policy or InstallPolicy()
        self.clock = clock
        self.wall_clock = wall_clock
        self.disk_free = disk_free
        self.counters = InstallerCounters()
        self._lock = threading.Lock()
        self._download: _Download | None = None
        self._busy: InstallJob | None = None
        self._parked: ReleaseOffer | None = None

    # -- reports ------------------------------------------------------------------------
    def _report(
        self,
        offer: ReleaseOffer,
        state: ReleaseState,
        *,
        refusal: ReleaseRefused | None = None,
        health: Health | None = None,
        install_s: float | None = None,
        detail: str = "",
    ) -> ReleaseReport:
        active = self.store.active
        return ReleaseReport(
            run=offer.run,
            agent_id=self.agent_id,
            prototype=self.profile.prototype,
            rollout=offer.rollout,
            version=offer.version,
            state=state,
            reason="ok" if refusal is None else refusal.reason.value,
            detail=(detail if refusal is None else refusal.detail)[:512],
            active_version=None if active is None else active.record.version,
            runtime=self.profile.inference.runtime,
            install_s=install_s,
            latency_p50_ms=None if health is None else health.latency_p50_ms,
            latency_p99_ms=None if health is None else health.latency_p99_ms,
            peak_rss_mb=None if health is None else health.peak_rss_mb,
            sent_at=self.wall_clock(),
        )

    def _failed(
        self, offer: ReleaseOffer, refusal: ReleaseRefused, health: Health | None = None
    ) -> Decision:
        self.counters.failed[refusal.reason.value] += 1
        log.warning("%s: release %d refused: %s", self.agent_id, offer.version, refusal)
        return Decision(reports=(self._report(offer, "failed", refusal=refusal, health=health),))

    # -- offers -------------------------------------------------------------------------
    def offer(self, offer: ReleaseOffer) -> Decision:
        """Judge an offer already authenticated as addressed to this agent."""
        with self._lock:
            self.counters.offers += 1
            if self._busy is not None:
                self._parked = offer  # judged when the install in progress ends
                return NOTHING
            return self._judge(offer)

    def _judge(self, offer: ReleaseOffer) -> Decision:
        received_at = self.clock()
        data = offer.metadata.encode()
        active = self.store.active
        if active is not None and hashlib.sha256(data).hexdigest() == active.record.digest:
            report = self._report(offer, "installed", detail="already serving this release")
            return Decision(reports=(report,))
        current = self._download
        try:
            release = self._verify(offer, data)
        except ReleaseRefused as e:
            return self._failed(offer, e)
        if current is not None and current.release.digest == release.digest:
            return Decision(
                reports=(self._report(offer, "downloading", detail="already fetching"),)
            )
        superseded = self._abandon(
            ReleaseRefused(ReleaseRefusal.DOWNLOAD_FAILED, f"superseded by release {offer.version}")
        )
        try:
            check_compatible(release, self.profile)
            download = self._stage(offer, release, received_at)
        except ReleaseRefused as e:
            return superseded + self._failed(offer, e)
        except OSError as e:
            return superseded + self._failed(offer, storage_refusal(e))
        self._download = download
        pending = download.pending
        size = sum(a.length for a, _ in pending.values())
        detail = f"{len(pending)} artifact(s), {size} bytes to fetch"
        started = superseded + Decision(
            reports=(self._report(offer, "downloading", detail=detail),)
        )
        if not pending:
            return started + self._all_arrived(download)
        refs = tuple(
            BlobRef(
                digest=a.sha256,
                size=a.length,
                chunk_size=offer.chunk_size,
                count=chunk_count(a.length, offer.chunk_size),
            )
            for a, _ in pending.values()
        )
        return started + Decision(fetch=refs)

    def _verify(self, offer: ReleaseOffer, data: bytes) -> Release:
        version, digest = self.store.trusted()
        release = verify_release(
            data,
            self.root,
            fleet=self.fleet,
            prototype=self.profile.prototype,
            trusted_version=version,
            trusted_digest=digest,
            now=datetime.fromtimestamp(self.wall_clock(), timezone.utc),
        )
        if offer.version != release.version:
            raise ReleaseRefused(
                ReleaseRefusal.MALFORMED,
                f"offer names version {offer.version}, its metadata {release.version}",
            )
        try:
            self.store.trust(release.version, release.digest)
        except OSError as e:
            raise storage_refusal(e) from e
        return release

    def _stage(self, offer: ReleaseOffer, release: Release, received_at: float) -> _Download:
        name = model_file_name(release)
        wanted = {name: release.model, REFERENCE_FILE: release.reference}
        self.store.folder.mkdir(parents=True, exist_ok=True)
        try:
            missing = self.store.stage({n: a.sha256 for n, a in wanted.items()})
        except SlotError as e:
            raise ReleaseRefused(ReleaseRefusal.MALFORMED, str(e)) from e
        pending = {wanted[n].sha256: (wanted[n], n) for n in missing}
        needed = sum(a.length for a, _ in pending.values()) + self.policy.disk_margin_bytes
        free = self.disk_free(self.store.folder)
        if free < needed:
            raise ReleaseRefused(
                ReleaseRefusal.NO_SPACE,
                f"{free / MB:.1f} MB free, {needed / MB:.1f} MB needed (artifacts and margin)",
            )
        record = SlotRecord(
            slot=self.store.staging_slot(),
            version=release.version,
            digest=release.digest,
            model=name,
            model_sha256=release.model.sha256,
            reference_sha256=release.reference.sha256,
        )
        return _Download(
            offer=offer, release=release, record=record, pending=pending, received_at=received_at
        )

    def _abandon(self, refusal: ReleaseRefused) -> Decision:
        """Give up the download in progress, if any: drop its blobs, report it failed."""
        d, self._download = self._download, None
        if d is None:
            return NOTHING
        return Decision(drop=tuple(d.pending)) + self._failed(d.offer, refusal)

    # -- artifacts ----------------------------------------------------------------------
    def wants(self, digest: str) -> bool:
        """True if ``digest`` is an artifact of the download in progress."""
        with self._lock:
            return self._download is not None and digest in self._download.pending

    def blob(self, digest: str, data: bytes) -> Decision:
        """An artifact arrived (reassembled, its SHA-256 checked by the receiver)."""
        with self._lock:
            d = self._download
            if d is None or digest not in d.pending:
                return NOTHING
            artifact, name = d.pending[digest]
            try:
                check_artifact(artifact, data)
                self.store.put(name, data)
            except ReleaseRefused as e:
                return self._abandon(e)
            except OSError as e:
                return self._abandon(storage_refusal(e))
            del d.pending[digest]
            return self._all_arrived(d) if not d.pending else NOTHING

    def blob_failed(self, digest: str, refusal: ReleaseRefused) -> Decision:
        """An artifact cannot arrive (bad chunks, timed out): the download fails."""
        with self._lock:
            d = self._download
            if d is None or digest not in d.pending:
                return NOTHING
            return self._abandon(refusal)

    def _all_arrived(self, d: _Download) -> Decision:
        try:
            self.store.put_metadata(d.release.raw)
        except OSError as e:
            return self._abandon(storage_refusal(e))
        self._download = None
        job = InstallJob(
            offer=d.offer, release=d.release, record=d.record, received_at=d.received_at
        )
        self._busy = job
        return Decision(reports=(self._report(d.offer, "verifying"),), job=job)

    def tick(self, now: float | None = None) -> Decision:
        """Time out a download; judge an offer parked during an install that has ended."""
        now = self.clock() if now is None else now
        with self._lock:
            if self._busy is None and self._parked is not None:
                offer, self._parked = self._parked, None
                return self._judge(offer)
            d = self._download
            if d is not None and now - d.received_at > self.policy.download_timeout_s:
                limit = self.policy.download_timeout_s
                return self._abandon(
                    ReleaseRefused(
                        ReleaseRefusal.DOWNLOAD_FAILED,
                        f"artifacts did not arrive within {limit:g} s",
                    )
                )
            return NOTHING

    # -- install (worker thread) --------------------------------------------------------
    def install(self, job: InstallJob) -> Decision:
        """Load, check, switch, serve. Slow (loads the model and times it): run it off the
        MQTT dispatcher. The model served until now keeps serving unless all passes."""
        try:
            return self._install(job)
        except Exception as e:  # a bug must not leave the device stuck mid-install
            log.exception("%s: install of release %d failed", self.agent_id, job.release.version)
            refusal = ReleaseRefused(ReleaseRefusal.LOAD_FAILED, f"unexpected error: {e}")
            return self._failed(job.offer, refusal)
        finally:
            with self._lock:
                self._busy = None

    def _install(self, job: InstallJob) -> Decision:
        spec, inference = job.release.spec, self.profile.inference
        try:
            staged = self.store.staged(job.record)
        except (SlotError, OSError) as e:
            return self._failed(job.offer, ReleaseRefused(ReleaseRefusal.BAD_ARTIFACT, str(e)))
        try:
            runner = load_artifact(
                staged.model_path,
                runtime=spec.runtime,
                threads=inference.threads,
                check_digest=False,
            )
        except Exception as e:  # runtimes raise their own exception types
            refusal = ReleaseRefused(ReleaseRefusal.LOAD_FAILED, f"{spec.runtime}: {e}")
            return self._failed(job.offer, refusal)
        health = check_health(
            runner,
            job.release,
            staged.reference,
            budget_ms=inference.latency_budget_ms,
            iters=self.policy.health_iters,
        )
        if not health.ok:
            reason = health.reason or ReleaseRefusal.PARITY
            return self._failed(job.offer, ReleaseRefused(reason, health.detail), health)
        try:
            self.store.switch(job.record)
        except SlotError as e:
            refusal = ReleaseRefused(ReleaseRefusal.BAD_ARTIFACT, str(e))
            return self._failed(job.offer, refusal, health)
        except OSError as e:
            return self._failed(job.offer, storage_refusal(e), health)
        self.holder.swap(ServedModel(runner, job.release))
        self.counters.installed += 1
        install_s = self.clock() - job.received_at
        log.info(
            "%s: release %d installed in %.1f s (batch-1 p50 %.3g ms, p99 %.3g ms)",
            self.agent_id,
            job.release.version,
            install_s,
            health.latency_p50_ms or 0.0,
            health.latency_p99_ms or 0.0,
        )
        report = self._report(job.offer, "installed", health=health, install_s=install_s)
        return Decision(reports=(report,))
