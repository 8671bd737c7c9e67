"""The arm64 field trial's release figures (benchmarks/arm64_release.py) come from the
rollout records, as the release service keeps them, and from what each agent's endpoint
answered: checked here on records moved by the rollout state machine itself (the trial
needs root, debootstrap and qemu, and runs outside the suite)."""

from __future__ import annotations

from benchmarks.arm64_release import device_figures, served_figures, tier_figures
from coordinator.deploy.rollout import ROLLBACK, Rollout, new_rollout
from coordinator.deploy.summary import rollout_rows
from takfl.wire.release import ReleaseReport


def report(r: Rollout, agent: str, state: str, **kw: object) -> ReleaseReport:
    fields: dict[str, object] = {
        "agent_id": agent,
        "prototype": r.prototype,
        "rollout": r.id,
        "version": r.version,
        "state": state,
        "sent_at": 1.0,
        **kw,
    }
    return ReleaseReport.model_validate(fields)


def two_stage_release() -> list[Rollout]:
    """S released in stages of half and all: S-000 installs, then S-001 fails its health
    check; M rolled back to its release 1 (a rollback release, not an install)."""
    s = new_rollout(
        prototype="S",
        version=2,
        agents=["S-001", "S-000"],
        now=0.0,
        stages=(0.5, 1.0),
        abort_above=0.6,
        artifact_bytes=5_120,
    )
    s.start(10.0)
    installed = {"runtime": "ai-edge-litert", "install_s": 12.34, "peak_rss_mb": 480.04}
    latency = {"latency_p50_ms": 3.456, "latency_p99_ms": 7.891}
    s.report("S-000", report(s, "S-000", "installed", **installed, **latency), 30.0)
    s.report("S-001", report(s, "S-001", "failed", reason="too_slow", detail="p99"), 75.55)
    m = new_rollout(
        prototype="M", version=3, agents=["M-000"], now=0.0, action=ROLLBACK, reinstates=1
    )
    m.start(5.0)
    return [s, m]


def test_device_figures_come_from_the_install_records_and_what_each_endpoint_served() -> None:
    rollouts = two_stage_release()
    served = {"S-000": {"predictions": 16, "correct": 15, "endpoint_p50_ms": 2.5}}

    rows = device_figures(rollouts, served)

    assert [r["agent"] for r in rows] == ["S-000", "S-001"]  # the rollback release left out
    assert rows[0] == {
        "agent": "S-000",
        "prototype": "S",
        "version": 2,
        "outcome": "installed",
        "reason": None,
        "runtime": "ai-edge-litert",
        "release_bytes": 5_120,
        "install_s": 12.3,
        "health_p50_ms": 3.46,
        "health_p99_ms": 7.89,
        "peak_rss_mb": 480.0,
        "predictions": 16,
        "correct": 15,
        "endpoint_p50_ms": 2.5,
    }
    assert rows[1]["outcome"] == "failed" and rows[1]["reason"] == "too_slow"
    assert rows[1]["install_s"] is None and "predictions" not in rows[1]


def test_tier_figures_keep_each_rollouts_state_bytes_and_whole_time() -> None:
    rollouts = two_stage_release()

    tiers = tier_figures(rollout_rows(rollouts))

    assert [(t["prototype"], t["version"]) for t in tiers] == [("M", 3), ("S", 2)]
    s = tiers[1]
    assert s == {
        "prototype": "S",
        "version": 2,
        "state": "completed",
        "devices": 2,
        "installed": 1,
        "failed": {"too_slow": 1},
        "bytes": 5_120,
        "install_s": 12.3,
        "rollout_s": 65.5,
    }
    assert tiers[0]["state"] == "running" and tiers[0]["rollout_s"] is None


def test_served_figures_count_right_answers_and_take_the_endpoints_own_latency() -> None:
    metrics = {
        "requests": 4,
        "errors": 1,
        "latency_p50_ms": 1.234,
        "latency_p99_ms": 9.876,
        "active_version": 2,
    }

    got = served_figures([7, None, 3, 1], [7, 2, 3, 4], [0.010, 0.020, 0.030], metrics, ["x"])

    assert got["predictions"] == 4 and got["correct"] == 2
    assert got["roundtrip_p50_ms"] == 20.0 and got["roundtrip_p99_ms"] == 29.8
    assert (got["endpoint_p50_ms"], got["endpoint_p99_ms"]) == (1.23, 9.88)
    assert (got["endpoint_requests"], got["endpoint_errors"], got["served_version"]) == (4, 1, 2)
    assert got["errors"] == ["x"]


def test_served_figures_of_an_endpoint_that_answered_nothing() -> None:
    got = served_figures([None, None], [1, 2], [], {}, ["refused", "refused"])

    assert got["correct"] == 0 and got["roundtrip_p50_ms"] is None
    assert got["endpoint_p50_ms"] is None and got["served_version"] is None
