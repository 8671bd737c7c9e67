"""The staged-rollout state machine, without a broker: stages, promotion, halt, rollback,
timeouts and the records it persists."""

from __future__ import annotations

import json

import pytest

from coordinator.deploy.records import DeviceState, RolloutState
from coordinator.deploy.rollout import (
    INSTALL,
    ROLLBACK,
    Offer,
    Rollout,
    fleet_release,
    new_rollout,
)
from coordinator.deploy.stages import RolloutError, parse_fraction, parse_stages, plan_stages
from takfl.wire.release import ReleaseReport

AGENTS = [f"M-{k:03d}" for k in range(10)]


def rollout(
    agents: list[str] = AGENTS, *, previous: int | None = 1, version: int = 2, **kw: object
) -> Rollout:
    args: dict[str, object] = {
        "prototype": "M",
        "version": version,
        "agents": agents,
        "now": 0.0,
        "stages": (0.1, 0.5, 1.0),
        "abort_above": 0.2,
        "device_timeout_s": 60.0,
        "previous": previous,
    }
    args.update(kw)
    return new_rollout(**args)  # type: ignore[arg-type]


def report(r: Rollout, agent: str, state: str, **kw: object) -> ReleaseReport:
    """A report about ``r`` (its version unless ``version=`` says otherwise)."""
    fields: dict[str, object] = {
        "agent_id": agent,
        "prototype": r.prototype,
        "rollout": r.id,
        "version": r.version,
        "state": state,
        "sent_at": 1.0,
    }
    fields.update(kw)
    return ReleaseReport.model_validate(fields)


def finish(r: Rollout, agents: list[str], state: str, now: float = 5.0, **kw: object) -> list[str]:
    """Report ``state`` for each agent; the events of the last report."""
    events: list[str] = []
    for a in agents:
        events = r.report(a, report(r, a, state, **kw), now).events
    return events


def offered(offers: list[Offer]) -> list[str]:
    return [o.agent for o in offers]


def states(r: Rollout) -> dict[str, str]:
    return {a: d.state.value for a, d in r.devices.items()}


# -- stages ---------------------------------------------------------------------------------
def test_stages_are_cumulative_fractions_of_the_devices_sorted_by_id() -> None:
    plan = plan_stages(reversed(AGENTS), (0.1, 0.5, 1.0))

    by_stage = [[a for a, k in sorted(plan.items()) if k == s] for s in range(3)]

    assert by_stage == [AGENTS[:1], AGENTS[1:5], AGENTS[5:]]
    assert plan_stages(["b", "a"], (0.1, 0.5, 1.0)) == {"a": 0, "b": 2}
    assert plan_stages(["x"], (0.5, 1.0)) == {"x": 0}


@pytest.mark.parametrize(
    ("text", "expected"), [("10%,50%,100%", (0.1, 0.5, 1.0)), ("1", (1.0,)), ("0.5,1", (0.5, 1.0))]
)
def test_stage_lists_parse(text: str, expected: tuple[float, ...]) -> None:
    assert parse_stages(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("50%,10%,100%", "increase"),
        ("10%,50%", "last stage"),
        ("0%,100%", "above 0%"),
        ("ten,100%", "percentage"),
        ("", "no stages"),
    ],
)
def test_bad_stage_lists_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(RolloutError, match=message):
        parse_stages(text)


def test_thresholds_parse_as_percent_or_fraction() -> None:
    assert parse_fraction("20%", "x") == pytest.approx(0.2)
    assert parse_fraction("0.35", "x") == pytest.approx(0.35)
    with pytest.raises(RolloutError, match="between"):
        parse_fraction("120%", "x")


def test_a_rollout_needs_devices_and_a_positive_timeout() -> None:
    with pytest.raises(RolloutError, match="no devices"):
        rollout([])
    with pytest.raises(RolloutError, match="timeout"):
        rollout(device_timeout_s=0)


# -- promotion ------------------------------------------------------------------------------
def test_start_offers_the_canary_stage_only() -> None:
    r = rollout()

    step = r.start(0.0)

    assert offered(step.offers) == ["M-000"] and step.changed
    assert all(o.version == 2 and o.action == INSTALL for o in step.offers)
    assert states(r)["M-000"] == "offered"
    assert {s for a, s in states(r).items() if a != "M-000"} == {"pending"}
    assert r.start(1.0).offers == []  # starting twice offers nothing again


def test_healthy_reports_promote_stage_by_stage_to_completion() -> None:
    r = rollout()
    r.start(0.0)

    finish(r, ["M-000"], "downloading")
    stage2 = r.report("M-000", report(r, "M-000", "installed", latency_p50_ms=1.5), 2.0)
    stage3 = Offer("x", 0, INSTALL)
    for a in AGENTS[1:5]:
        step = r.report(a, report(r, a, "installed"), 3.0)
        if step.offers:
            stage3 = step.offers[0]
    done = finish(r, AGENTS[5:], "installed", now=4.0)

    assert offered(stage2.offers) == AGENTS[1:5]
    assert stage3.agent == "M-005"
    assert r.state == RolloutState.COMPLETED and r.finished_at == 4.0
    assert any("completed, 10/10 installed" in e for e in done)
    assert r.devices["M-000"].latency_p50_ms == 1.5
    assert fleet_release([r], "M") == 2


def test_a_stage_waits_until_every_device_of_it_is_final() -> None:
    r = rollout()
    r.start(0.0)
    finish(r, ["M-000"], "installed")

    finish(r, AGENTS[1:4], "installed")
    step = r.report("M-004", report(r, "M-004", "verifying"), 6.0)

    assert step.offers == []
    assert r.stage == 1 and states(r)["M-005"] == "pending"


def test_reports_only_move_a_device_forward() -> None:
    r = rollout()
    r.start(0.0)
    r.report("M-000", report(r, "M-000", "verifying"), 1.0)

    back = r.report("M-000", report(r, "M-000", "downloading"), 2.0)
    r.report("M-000", report(r, "M-000", "installed"), 3.0)
    again = r.report("M-000", report(r, "M-000", "failed", reason="parity"), 4.0)

    assert not back.changed and not again.changed
    assert r.devices["M-000"].state == DeviceState.INSTALLED
    assert r.devices["M-000"].outcome == "installed"


@pytest.mark.parametrize(
    "change",
    [
        {"rollout": "M-v9"},
        {"prototype": "S"},
        {"version": 7},
    ],
)
def test_reports_of_other_rollouts_prototypes_or_versions_change_nothing(
    change: dict[str, object],
) -> None:
    r = rollout()
    r.start(0.0)

    step = r.report("M-000", report(r, "M-000", "failed", **change), 1.0)

    assert not step.changed and states(r)["M-000"] == "offered"


def test_a_report_from_a_device_not_offered_yet_or_unknown_is_ignored() -> None:
    r = rollout()
    r.start(0.0)

    pending = r.report("M-007", report(r, "M-007", "failed"), 1.0)
    stranger = r.report("X-1", report(r, "X-1", "failed"), 1.0)

    assert not pending.changed and not stranger.changed
    assert r.state == RolloutState.RUNNING


def test_failures_within_the_threshold_do_not_halt() -> None:
    r = rollout()
    r.start(0.0)
    finish(r, ["M-000"], "installed")

    finish(r, ["M-001"], "failed", reason="parity")  # 1 of 5 offered: 20%, not above
    finish(r, AGENTS[2:5], "installed")

    assert r.state == RolloutState.RUNNING and r.stage == 2


# -- halt and rollback ----------------------------------------------------------------------
def test_a_failed_canary_halts_and_asks_for_a_rollback() -> None:
    r = rollout()
    r.start(0.0)

    step = r.report("M-000", report(r, "M-000", "failed", reason="parity", detail="off"), 1.0)

    assert r.state == RolloutState.HALTED and step.needs_rollback and not r.finished
    assert "1 of 1 device(s) failed (100% > 20%)" in r.halt_reason
    assert r.devices["M-000"].reason == "parity" and r.devices["M-000"].detail == "off"
    assert step.offers == []


def test_halt_rolls_back_installed_failed_and_unfinished_devices_only() -> None:
    r = rollout()
    r.start(0.0)
    finish(r, ["M-000"], "installed")
    finish(r, ["M-001"], "installed")
    r.report("M-002", report(r, "M-002", "downloading"), 2.0)
    finish(r, ["M-003"], "failed", reason="too_slow")

    halt = r.report("M-004", report(r, "M-004", "failed", reason="load_failed"), 3.0)
    back = r.begin_rollback(3, 4.0)

    assert halt.needs_rollback and r.state == RolloutState.HALTED
    assert sorted(offered(back.offers)) == AGENTS[:5]
    assert all(o.version == 3 and o.action == ROLLBACK for o in back.offers)
    assert {states(r)[a] for a in AGENTS[5:]} == {"pending"}
    assert {states(r)[a] for a in AGENTS[:5]} == {"rolling_back"}
    assert r.devices["M-003"].outcome == "failed" and r.devices["M-003"].reason == "too_slow"


def test_the_rollback_finishes_when_every_device_reported_it() -> None:
    r = rollout(["M-000", "M-001"], stages=(1.0,), abort_above=0.4)
    r.start(0.0)
    finish(r, ["M-000"], "installed")
    finish(r, ["M-001"], "failed", reason="parity")
    r.begin_rollback(3, 6.0)

    r.report("M-000", report(r, "M-000", "installed", version=3, active_version=1), 7.0)
    last = r.report("M-001", report(r, "M-001", "failed", version=3, reason="no_space"), 8.0)

    assert states(r) == {"M-000": "rolled_back", "M-001": "rollback_failed"}
    assert r.devices["M-001"].rollback_reason == "no_space"
    assert r.devices["M-000"].active_version == 1
    assert r.state == RolloutState.ROLLED_BACK and r.finished_at == 8.0
    assert any("rolled back to release 1" in e for e in last.events)
    assert fleet_release([r], "M") == 1


def test_a_late_install_report_during_the_rollback_is_recorded_not_applied() -> None:
    r = rollout(["M-000", "M-001"], stages=(1.0,), abort_above=0.4)
    r.start(0.0)
    r.report("M-000", report(r, "M-000", "downloading"), 1.0)
    finish(r, ["M-001"], "failed", reason="parity")  # 1 of 2 > 40%: halt mid-download
    r.begin_rollback(3, 2.0)

    late = r.report("M-000", report(r, "M-000", "installed"), 3.0)

    assert late.changed and r.devices["M-000"].outcome == "installed"
    assert r.devices["M-000"].state == DeviceState.ROLLING_BACK
    assert r.state == RolloutState.HALTED and not r.finished


def test_with_no_previous_release_a_halt_has_nothing_to_roll_back() -> None:
    r = rollout(previous=None)
    r.start(0.0)

    step = r.report("M-000", report(r, "M-000", "failed", reason="parity"), 1.0)

    assert r.state == RolloutState.HALTED and r.finished and not step.needs_rollback
    assert "no previous release" in r.halt_reason
    assert step.offers == [] and fleet_release([r], "M") is None
    with pytest.raises(RolloutError, match="not halted with a release"):
        r.begin_rollback(3, 2.0)


def test_a_rollback_release_must_be_newer() -> None:
    r = rollout()
    r.start(0.0)
    finish(r, ["M-000"], "failed", reason="parity")

    with pytest.raises(RolloutError, match="newer version"):
        r.begin_rollback(2, 2.0)


def test_an_abandoned_rollback_leaves_the_rollout_halted_and_finished() -> None:
    r = rollout()
    r.start(0.0)
    finish(r, ["M-000"], "failed", reason="parity")

    r.abandon_rollback("release key missing", 2.0)

    assert r.state == RolloutState.HALTED and r.finished
    assert "release key missing" in r.halt_reason


# -- timeouts and re-offers -----------------------------------------------------------------
def test_a_silent_device_times_out_and_counts_as_a_failure() -> None:
    r = rollout()
    r.start(0.0)

    early = r.tick(59.0)
    late = r.tick(60.0)

    assert not early.changed
    assert r.devices["M-000"].state == DeviceState.TIMED_OUT
    assert r.devices["M-000"].reason == "timed_out"
    assert late.needs_rollback and r.state == RolloutState.HALTED


def test_a_rollback_that_gets_no_answer_times_out() -> None:
    r = rollout()
    r.start(0.0)
    finish(r, ["M-000"], "failed", reason="parity")
    r.begin_rollback(3, 10.0)

    r.tick(69.0)
    assert r.devices["M-000"].state == DeviceState.ROLLING_BACK
    r.tick(70.0)

    assert r.devices["M-000"].state == DeviceState.ROLLBACK_FAILED
    assert r.devices["M-000"].rollback_reason == "timed_out"
    assert r.state == RolloutState.ROLLED_BACK


def test_unanswered_offers_are_sent_again() -> None:
    r = rollout(["M-000", "M-001"], stages=(1.0,))
    r.start(0.0)
    r.report("M-001", report(r, "M-001", "downloading"), 1.0)

    early = r.resends(10.0, 15.0)
    due = r.resends(15.0, 15.0)
    again = r.resends(20.0, 15.0)

    assert early == [] and again == []
    assert due == [Offer("M-000", 2, INSTALL)]


def test_stop_ends_an_unfinished_rollout_as_halted() -> None:
    r = rollout()
    r.start(0.0)

    step = r.stop("the command's --timeout passed", 100.0)

    assert r.state == RolloutState.HALTED and r.finished and step.changed
    assert r.halt_reason == "the command's --timeout passed"
    assert not r.stop("again", 101.0).changed


# -- rollback rollouts and records -----------------------------------------------------------
def test_a_rollback_rollout_offers_everyone_at_once_and_never_halts() -> None:
    r = new_rollout(
        prototype="M",
        version=5,
        agents=AGENTS[:3],
        now=0.0,
        action=ROLLBACK,
        reinstates=2,
        stages=(0.1, 1.0),
        abort_above=0.0,
    )

    step = r.start(0.0)
    finish(r, AGENTS[:2], "failed", reason="no_space")
    finish(r, AGENTS[2:3], "installed")

    assert offered(step.offers) == AGENTS[:3] and step.offers[0].action == ROLLBACK
    assert r.state == RolloutState.COMPLETED and r.previous is None
    assert fleet_release([r], "M") == 2


def test_the_fleet_release_is_the_newest_completed_or_returned_to() -> None:
    done = rollout(version=1, previous=None)
    done.start(0.0)
    finish(done, AGENTS[:1], "installed")
    finish(done, AGENTS[1:5], "installed")
    finish(done, AGENTS[5:], "installed")
    halted = rollout(version=2, previous=1)
    halted.start(0.0)
    finish(halted, ["M-000"], "failed", reason="parity")

    assert fleet_release([done, halted], "M") == 1
    assert fleet_release([done, halted], "S") is None


def test_records_round_trip_through_json_and_carry_on() -> None:
    r = rollout()
    r.start(0.0)
    finish(r, ["M-000"], "installed", runtime="onnxruntime", install_s=2.5)

    again = Rollout.from_dict(json.loads(json.dumps(r.to_dict())))
    finish(again, AGENTS[1:5], "installed")

    assert (
        again.devices["M-000"].install_s == 2.5 and again.devices["M-000"].runtime == "onnxruntime"
    )
    assert again.stages == (0.1, 0.5, 1.0) and again.state == RolloutState.RUNNING
    assert again.stage == 2 and states(again)["M-009"] == "offered"
