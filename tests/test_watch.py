"""status --watch: the live view of a run directory in the middle of a round."""

from __future__ import annotations

from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.store import RunStore
from coordinator.telemetry_log import TelemetryRecorder
from coordinator.watch import watch_view
from takfl.wire.telemetry import Telemetry


def test_watch_view_of_an_open_round(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = RunStore(tmp_path)
    plan = {"S": ["S-000", "S-001", "S-002"], "L": ["L-000"]}
    store.write_state({"round": 1, "phase": "collecting", "open_round": {"id": 2, "plan": plan}})
    rec = TelemetryRecorder(store)
    for proto, ids in plan.items():
        for a in ids:
            rec.registered(a, proto, Telemetry())
            rec.presence(a, proto, a != "S-002")
    rec.round_started(2, plan)
    rec.refused("S-001", "S", 2, "expired")
    # S-000's update of round 2 is accepted and persisted as a pending update
    (store.pending_dir(2)).mkdir(parents=True)
    (store.pending_dir(2) / "S-000.safetensors").write_bytes(b"")

    view = watch_view(tmp_path)
    rows = {a.agent_id: a for a in view.agents}
    assert view.open_round == 2 and view.phase == "collecting"
    assert rows["S-000"].this_round == "answered"
    assert rows["S-001"].this_round == "late"
    assert rows["S-002"].this_round == "sampled" and rows["S-002"].online is False
    assert view.stragglers == ["L-000", "S-001", "S-002"]

    out = CliRunner().invoke(
        app,
        ["status", "--run-dir", str(tmp_path), "--watch", "--times", "2", "--interval", "0.1"],
        terminal_width=200,
    )
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())  # the title may wrap at the console's width
    assert "stragglers: L-000, S-001, S-002" in text
    assert "round 2 open" in text


def test_watch_needs_a_run_dir() -> None:
    out = CliRunner().invoke(app, ["status", "--broker", "mqtt://x:1", "--watch"])
    assert out.exit_code == 2 and "--run-dir" in out.output
