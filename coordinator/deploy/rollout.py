"""Staged rollout of one release to one prototype's devices: a pure state machine.

No broker, no files, no clock of its own: every method takes the time (unix seconds)
and returns a :class:`Step` saying what to send and what happened; the release
service (:mod:`coordinator.deploy.service`) publishes and persists.

Semantics, after AWS IoT Greengrass deployments (rollout, abort criteria, per-device
timeout, rollback on failure):

- **Stages** are cumulative fractions of the prototype's devices, sorted by id (so the
  same fleet always gets the same canaries): ``(0.1, 0.5, 1.0)`` offers the release to
  the first 10 % (at least one device), then up to 50 %, then to all.
- A device goes ``offered -> downloading -> verifying -> installed | failed``, as its
  reports say (steps may be skipped; a report never moves it backwards), or
  ``timed_out`` when no final report came within ``device_timeout_s`` of its offer.
  ``failed`` and ``timed_out`` are failures.
- **Promotion:** when every device offered so far has reached a final state and the
  failures are within the threshold, the next stage is offered; after the last one the
  rollout is ``completed``.
- **Halt:** as soon as failures / devices offered so far exceed ``abort_above``, the
  rollout is ``halted`` and nothing more is offered. If the prototype had a release
  before this one (``previous``), every device offered this release (installed,
  failed, timed out, or still installing: each may have moved its trusted version
  forward) is rolled back: :attr:`Step.needs_rollback` asks the caller for a rollback
  release (a newer version whose spec reinstates ``previous``) and
  :meth:`Rollout.begin_rollback` offers it. A device then goes ``rolling_back ->
  rolled_back | rollback_failed``; when none is left rolling back, the rollout is
  ``rolled_back``. With no previous release the rollout stays ``halted`` with nothing
  to roll back (its devices keep what they have).
- A ``rollback`` rollout (``takfl-coordinator rollback``) offers a rollback release to
  every device at once and never halts.

The records are plain data (:meth:`Rollout.to_dict` / :meth:`Rollout.from_dict`) so
the service can persist them after every transition.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from coordinator.deploy.records import (
    FAILURES,
    FINAL,
    IN_PROGRESS,
    PROGRESS,
    REPORTED,
    TIMED_OUT_REASON,
    Device,
    DeviceState,
    RolloutState,
)
from coordinator.deploy.stages import RolloutError, parse_stages, plan_stages
from takfl.wire.release import ReleaseAction, ReleaseReport

INSTALL: ReleaseAction = "install"
ROLLBACK: ReleaseAction = "rollback"


@dataclass(frozen=True)
class Offer:
    """Send release ``version`` to ``agent`` (``action``: install or rollback)."""

    agent: str
    version: int
    action: ReleaseAction


@dataclass(kw_only=True)
class Step:
    """What one call changed: offers to send, progress lines, and whether the caller
    must now make a rollback release and call :meth:`Rollout.begin_rollback`."""

    offers: list[Offer] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    changed: bool = False
    needs_rollback: bool = False

    def merge(self, other: Step) -> Step:
        self.offers += other.offers
        self.events += other.events
        self.changed = self.changed or other.changed
        self.needs_rollback = self.needs_rollback or other.needs_rollback
        return self


@dataclass(kw_only=True)
class Rollout:
    """One release rolled out to one prototype's devices (see the module docstring)."""

    id: str
    prototype: str
    version: int  # the release offered
    action: ReleaseAction
    reinstates: int  # the release whose model it installs (itself unless a rollback)
    stages: tuple[float, ...]
    abort_above: float  # halt when failures / devices offered so far exceed this
    device_timeout_s: float
    previous: int | None  # the release the fleet ran before: what a halt rolls back to
    created_at: float
    state: RolloutState = RolloutState.RUNNING
    stage: int = 0  # the stage being rolled out
    started_at: float | None = None
    finished_at: float | None = None
    halt_reason: str = ""
    rollback_version: int | None = None  # the rollback release, once made
    artifact_bytes: int = 0  # model + reference bytes a device downloads
    devices: dict[str, Device] = field(default_factory=dict)

    # -- views ----------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def offered_so_far(self) -> list[Device]:
        return [d for d in self.devices.values() if d.stage <= self.stage]

    # -- transitions ------------------------------------------------------------------
    def start(self, now: float) -> Step:
        """Offer the first stage (and any empty stages after it)."""
        if self.started_at is not None or self.finished:
            return Step()
        self.started_at = now
        step = Step(changed=True, events=[f"{self.id}: rolling out {self._what()}"])
        step.merge(self._offer_stage(now))
        return step.merge(self._evaluate(now))

    def report(self, agent: str, msg: ReleaseReport, now: float) -> Step:
        """Apply a device's (authenticated) report; unknown devices, other versions,
        repeats and backward steps change nothing."""
        device = self.devices.get(agent)
        if device is None or msg.prototype != self.prototype or msg.rollout != self.id:
            return Step()
        if msg.version == self.version:
            step = self._install_report(device, msg, now)
        elif self.rollback_version is not None and msg.version == self.rollback_version:
            step = self._rollback_report(device, msg, now)
        else:
            return Step()
        return step.merge(self._evaluate(now)) if step.changed else step

    def tick(self, now: float) -> Step:
        """Time out devices past ``device_timeout_s`` since their offer."""
        step = Step()
        for d in self.devices.values():
            if d.state in IN_PROGRESS and self._expired(d.offered_at, now):
                self._finish(d, DeviceState.TIMED_OUT, now, TIMED_OUT_REASON)
                d.detail = f"no final report within {self.device_timeout_s:.0f}s"
                step.events.append(f"{self.id}: {d.agent} timed out")
            elif d.state == DeviceState.ROLLING_BACK and self._expired(d.rollback_offered_at, now):
                d.state, d.rollback_reason = DeviceState.ROLLBACK_FAILED, TIMED_OUT_REASON
                d.finished_at = now
                step.events.append(f"{self.id}: rollback of {d.agent} timed out")
        step.changed = bool(step.events)
        return step.merge(self._evaluate(now)) if step.changed else step

    def _expired(self, since: float | None, now: float) -> bool:
        return since is not None and now - since >= self.device_timeout_s

    def resends(self, now: float, every_s: float) -> list[Offer]:
        """Offers unanswered for ``every_s``: sent again (an idempotent re-offer)."""
        out = []
        for d in self.devices.values():
            if d.heard_at is not None or d.sent_at is None or now - d.sent_at < every_s:
                continue
            if d.state == DeviceState.OFFERED:
                out.append(Offer(d.agent, self.version, self.action))
            elif d.state == DeviceState.ROLLING_BACK and self.rollback_version is not None:
                out.append(Offer(d.agent, self.rollback_version, ROLLBACK))
            else:
                continue
            d.sent_at = now
        return out

    def begin_rollback(self, version: int, now: float) -> Step:
        """Offer rollback release ``version`` to every device offered this release."""
        if self.state != RolloutState.HALTED or self.previous is None or self.finished:
            raise RolloutError(f"{self.id} is not halted with a release to roll back to")
        if version <= self.version:
            raise RolloutError(f"a rollback of version {self.version} needs a newer version")
        self.rollback_version = version
        step = Step(changed=True)
        for d in self.devices.values():
            if d.state == DeviceState.PENDING:
                continue
            d.state, d.rollback_offered_at, d.sent_at, d.heard_at = (
                DeviceState.ROLLING_BACK,
                now,
                now,
                None,
            )
            step.offers.append(Offer(d.agent, version, ROLLBACK))
        step.events.append(
            f"{self.id}: rolling {len(step.offers)} device(s) back to release "
            f"{self.previous} (as version {version})"
        )
        return step.merge(self._evaluate(now))

    def abandon_rollback(self, detail: str, now: float) -> Step:
        """The rollback release could not be made: stay halted, say why, finish."""
        self.halt_reason += f"; no rollback: {detail}"
        self.finished_at = now
        return Step(changed=True, events=[f"{self.id}: cannot roll back ({detail})"])

    def stop(self, reason: str, now: float) -> Step:
        """End an unfinished rollout where it stands (e.g. the command's time is up)."""
        if self.finished:
            return Step()
        if self.state == RolloutState.RUNNING:
            self.state = RolloutState.HALTED
        self.halt_reason = f"{self.halt_reason}; {reason}" if self.halt_reason else reason
        self.finished_at = now
        return Step(changed=True, events=[f"{self.id}: stopped ({reason})"])

    # -- internals ----------------------------------------------------------------------
    def _what(self) -> str:
        if self.action == ROLLBACK:
            return f"rollback release {self.version} (reinstates {self.reinstates})"
        return f"release {self.version}"

    def _offer_stage(self, now: float) -> Step:
        step = Step()
        for d in sorted(self.devices.values(), key=lambda d: d.agent):
            if d.stage == self.stage and d.state == DeviceState.PENDING:
                d.state, d.offered_at, d.sent_at = DeviceState.OFFERED, now, now
                step.offers.append(Offer(d.agent, self.version, self.action))
        if step.offers:
            step.changed = True
            step.events.append(
                f"{self.id}: stage {self.stage + 1}/{len(self.stages)} "
                f"({self.stages[self.stage]:.0%}): offered to {len(step.offers)} device(s)"
            )
        return step

    def _finish(self, d: Device, state: DeviceState, now: float, reason: str = "") -> None:
        d.state, d.outcome, d.reason, d.finished_at = state, state.value, reason, now

    def _install_report(self, d: Device, msg: ReleaseReport, now: float) -> Step:
        new = REPORTED[msg.state]
        if d.state == DeviceState.PENDING:  # not offered this release: not its report
            return Step()
        if d.state not in PROGRESS:  # rolling back (or done with it): a late report
            if new in FINAL and d.outcome is None:
                d.outcome = new.value
                return Step(changed=True)
            return Step()
        if PROGRESS[new] <= PROGRESS[d.state]:
            return Step()
        d.heard_at = now
        d.active_version = msg.active_version or d.active_version
        if new == DeviceState.INSTALLED:
            self._finish(d, new, now)
            d.runtime, d.install_s = msg.runtime, msg.install_s
            d.latency_p50_ms, d.latency_p99_ms = msg.latency_p50_ms, msg.latency_p99_ms
            d.peak_rss_mb = msg.peak_rss_mb
            event = f"{self.id}: {d.agent} installed" + (
                f" (p50 {msg.latency_p50_ms:.2f} ms)" if msg.latency_p50_ms is not None else ""
            )
        elif new == DeviceState.FAILED:
            self._finish(d, new, now, msg.reason)
            d.detail = msg.detail
            event = f"{self.id}: {d.agent} failed: {msg.reason} {msg.detail}".rstrip()
        else:
            d.state = new
            return Step(changed=True)
        return Step(changed=True, events=[event])

    def _rollback_report(self, d: Device, msg: ReleaseReport, now: float) -> Step:
        if d.state != DeviceState.ROLLING_BACK:
            return Step()
        d.heard_at = now
        d.active_version = msg.active_version or d.active_version
        if msg.state == "installed":
            d.state, d.finished_at = DeviceState.ROLLED_BACK, now
            return Step(changed=True, events=[f"{self.id}: {d.agent} rolled back"])
        if msg.state == "failed":
            d.state, d.rollback_reason, d.finished_at = DeviceState.ROLLBACK_FAILED, msg.reason, now
            return Step(
                changed=True, events=[f"{self.id}: rollback of {d.agent} failed: {msg.reason}"]
            )
        return Step(changed=True)

    def _evaluate(self, now: float) -> Step:
        """Halt, promote or complete, as the device states now allow."""
        step = Step()
        if self.state == RolloutState.HALTED:
            rolling = any(d.state == DeviceState.ROLLING_BACK for d in self.devices.values())
            if self.rollback_version is not None and not self.finished and not rolling:
                self.state, self.finished_at = RolloutState.ROLLED_BACK, now
                step.changed = True
                step.events.append(f"{self.id}: rolled back to release {self.previous}")
            return step
        while self.state == RolloutState.RUNNING:
            offered = self.offered_so_far()
            failures = sum(d.state in FAILURES for d in offered)
            if offered and failures / len(offered) > self.abort_above:
                return step.merge(self._halt(failures, len(offered), now))
            if not all(d.state in FINAL for d in offered):
                break
            if self.stage + 1 >= len(self.stages):
                self.state, self.finished_at = RolloutState.COMPLETED, now
                step.changed = True
                installed = sum(d.state == DeviceState.INSTALLED for d in offered)
                step.events.append(
                    f"{self.id}: completed, {installed}/{len(self.devices)} installed"
                )
                break
            self.stage += 1
            step.changed = True
            step.merge(self._offer_stage(now))
        return step

    def _halt(self, failures: int, offered: int, now: float) -> Step:
        self.state = RolloutState.HALTED
        self.halt_reason = (
            f"{failures} of {offered} device(s) failed "
            f"({failures / offered:.0%} > {self.abort_above:.0%})"
        )
        step = Step(changed=True, events=[f"{self.id}: halted: {self.halt_reason}"])
        if self.previous is None:
            self.halt_reason += "; no previous release to roll back to"
            self.finished_at = now
            step.events.append(f"{self.id}: no previous release: nothing to roll back")
        else:
            step.needs_rollback = True
        return step

    # -- records ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "devices"}
        out["state"] = self.state.value
        out["stages"] = list(self.stages)
        out["devices"] = {a: d.to_dict() for a, d in sorted(self.devices.items())}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rollout:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["state"] = RolloutState(values.get("state", RolloutState.RUNNING.value))
        values["stages"] = tuple(float(v) for v in values.get("stages", (1.0,)))
        values["devices"] = {a: Device.from_dict(d) for a, d in data.get("devices", {}).items()}
        return cls(**values)


def rollout_id(prototype: str, version: int) -> str:
    """The id of the rollout of ``prototype``'s release ``version`` (unique per run)."""
    return f"{prototype}-v{version}"


def new_rollout(
    *,
    prototype: str,
    version: int,
    agents: Iterable[str],
    now: float,
    action: ReleaseAction = INSTALL,
    reinstates: int | None = None,
    stages: Sequence[float] = (0.1, 0.5, 1.0),
    abort_above: float = 0.2,
    device_timeout_s: float = 600.0,
    previous: int | None = None,
    artifact_bytes: int = 0,
) -> Rollout:
    """A rollout not started yet. A ``rollback`` action offers everyone at once and
    never halts (its ``stages`` and ``abort_above`` are ignored).

    Raises:
        RolloutError: no agents, bad stages, threshold or timeout.
    """
    if device_timeout_s <= 0:
        raise RolloutError(f"the device timeout must be positive, got {device_timeout_s}")
    if action == ROLLBACK:
        stages, abort_above, previous = (1.0,), 1.0, None
    stages = parse_stages(stages)
    if not 0.0 <= abort_above <= 1.0:
        raise RolloutError(f"the abort threshold must lie in [0, 1], got {abort_above}")
    plan = plan_stages(agents, stages)
    return Rollout(
        id=rollout_id(prototype, version),
        prototype=prototype,
        version=version,
        action=action,
        reinstates=reinstates if reinstates is not None else version,
        stages=stages,
        abort_above=abort_above,
        device_timeout_s=device_timeout_s,
        previous=previous,
        created_at=now,
        artifact_bytes=artifact_bytes,
        devices={a: Device(agent=a, stage=k) for a, k in plan.items()},
    )


def fleet_release(rollouts: Iterable[Rollout], prototype: str) -> int | None:
    """The release ``prototype``'s devices run as far as the records tell: the model
    reinstated by its newest completed rollout, or the release a newer rolled-back one
    returned to; None if no rollout of it completed."""
    for r in sorted(
        (r for r in rollouts if r.prototype == prototype), key=lambda r: r.version, reverse=True
    ):
        if r.state == RolloutState.COMPLETED:
            return r.reinstates
        if r.state == RolloutState.ROLLED_BACK and r.previous is not None:
            return r.previous
    return None
