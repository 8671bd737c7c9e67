"""What a rollout records per device, and the states it and its devices go through.

Plain data: :mod:`coordinator.deploy.rollout` moves the states, the release store
persists them as JSON (``RUN/releases/rollouts.json``), status and the report read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

from takfl.release.metadata import ReleaseRefusal


class DeviceState(str, Enum):
    """Where one device is in a rollout."""

    PENDING = "pending"  # in a later stage, not offered yet
    OFFERED = "offered"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLED = "installed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    ROLLING_BACK = "rolling_back"  # offered the rollback release
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"


class RolloutState(str, Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    HALTED = "halted"
    ROLLED_BACK = "rolled_back"


IN_PROGRESS = frozenset({DeviceState.OFFERED, DeviceState.DOWNLOADING, DeviceState.VERIFYING})
FINAL = frozenset({DeviceState.INSTALLED, DeviceState.FAILED, DeviceState.TIMED_OUT})
FAILURES = frozenset({DeviceState.FAILED, DeviceState.TIMED_OUT})
# How far along an install each state is: a report may only move a device forward.
PROGRESS = {
    DeviceState.OFFERED: 1,
    DeviceState.DOWNLOADING: 2,
    DeviceState.VERIFYING: 3,
    DeviceState.INSTALLED: 4,
    DeviceState.FAILED: 4,
    DeviceState.TIMED_OUT: 4,
}
REPORTED = {  # a ReleaseReport's state
    "downloading": DeviceState.DOWNLOADING,
    "verifying": DeviceState.VERIFYING,
    "installed": DeviceState.INSTALLED,
    "failed": DeviceState.FAILED,
}
TIMED_OUT_REASON = ReleaseRefusal.TIMED_OUT.value


@dataclass(kw_only=True)
class Device:
    """One device's record in a rollout (times in unix seconds)."""

    agent: str
    stage: int  # index of the stage that offers it
    state: DeviceState = DeviceState.PENDING
    outcome: str | None = None  # how the install ended: installed | failed | timed_out
    reason: str = ""  # the ReleaseRefusal value when the install failed or timed out
    detail: str = ""
    offered_at: float | None = None
    sent_at: float | None = None  # the current offer last sent (re-sent while unanswered)
    heard_at: float | None = None  # last report about the current offer
    finished_at: float | None = None
    runtime: str = ""
    active_version: int | None = None  # what the device says it serves now
    install_s: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    peak_rss_mb: float | None = None
    rollback_offered_at: float | None = None
    rollback_reason: str = ""  # why the rollback failed

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = self.state.value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Device:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["state"] = DeviceState(values.get("state", DeviceState.PENDING.value))
        return cls(**values)
