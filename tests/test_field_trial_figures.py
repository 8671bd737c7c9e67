"""The arm64 field trial reads its per-agent figures from the coordinator's telemetry log:
checked here on a log written by the coordinator's own recorder (the trial itself needs
root, debootstrap and qemu, and runs outside the suite: benchmarks/field_arm64.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from coordinator.store import RunStore
from coordinator.telemetry_log import TelemetryRecorder
from tests.test_report import header

REPO = Path(__file__).resolve().parents[1]


def load_trial_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "field_arm64", REPO / "benchmarks" / "field_arm64.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("field_arm64", module)
    spec.loader.exec_module(module)
    return module


def test_agent_figures_come_from_the_recorders_update_records(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    recorder = TelemetryRecorder(store, clock=lambda: 1.0)
    recorder.registered("S-000", "S", None)
    for r in (1, 2):
        recorder.accepted(header(r, "S-000", "S", train_s=10.0 / r, rss=300.0 + r))
        recorder.accepted(header(r, "L-000", "L", train_s=90.0 + r, rss=500.0 - r))
    recorder.refused("M-000", "M", 1, "late")
    agents = [
        ("S-000", "raspberry-pi-4", 44),
        ("M-000", "raspberry-pi-5", 281),
        ("L-000", "workstation", 562),
    ]

    figures = load_trial_script().agent_figures(store.root, agents)

    by_agent = {f["agent"]: f for f in figures}
    assert by_agent["S-000"] == {
        "agent": "S-000",
        "profile": "raspberry-pi-4",
        "samples": 44,
        "rounds": 2,
        "train_s": [10.0, 5.0],
        "update_bytes": [1000, 1000],
        "compression": "fp16",
        "peak_rss_mb": 302.0,
    }
    assert by_agent["L-000"]["train_s"] == [91.0, 92.0]
    assert by_agent["L-000"]["update_bytes"] == [3000, 3000]
    assert by_agent["L-000"]["peak_rss_mb"] == 499.0
    # a refused update is no round trained: the trial reports the agent as short of rounds
    assert by_agent["M-000"]["rounds"] == 0 and by_agent["M-000"]["peak_rss_mb"] is None
