"""Telemetry is a claim, not a fact: values no device of the tier can have measured
(memory over its hardware or profile limit, times or deadline slack past the round's
deadline x k) are stored flagged, shown as such in the report and counted in the
metrics, never as measurements."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from coordinator.metrics import PrometheusMetrics
from coordinator.report.data import build_report
from coordinator.report.write import render_html
from coordinator.store import RunStore
from coordinator.telemetry_log import ANY_DEVICE, TelemetryRecorder, plausibility
from takfl.config import load_federation
from takfl.config.profile import HARDWARE_MEMORY_MB, HardwareClass
from takfl.wire.telemetry import Plausibility, Telemetry, implausible
from tests.test_report import header, write_metrics

LIAR = Telemetry(train_s=1e9, peak_rss_mb=1e9, rss_limit_mb=512.0, deadline_slack_s=-1e9)


def test_implausible_names_every_value_out_of_reach() -> None:
    bounds = Plausibility(memory_mb=768.0, seconds=240.0)
    honest = Telemetry(train_s=30.0, peak_rss_mb=700.0, rss_limit_mb=768.0, deadline_slack_s=90.0)
    assert implausible(honest, bounds) == {}
    assert implausible(LIAR, bounds) == {
        "train_s": 1e9,
        "peak_rss_mb": 1e9,
        "deadline_slack_s": -1e9,
    }
    assert implausible(Telemetry(deadline_slack_s=241.0), bounds) == {"deadline_slack_s": 241.0}
    with pytest.raises(ValueError, match="memory_mb"):
        Plausibility(memory_mb=0.0, seconds=1.0)


def test_bounds_come_from_the_profiles_and_the_deadline() -> None:
    bounds = plausibility(load_federation("digits"), deadline_s=120.0)
    # the hardware class's memory, not the profile's (soft) limit: an honest agent's
    # peak can pass the limit (the S profile allows 768 MB, a torch process uses more)
    assert bounds["S"] == Plausibility(memory_mb=float(HARDWARE_MEMORY_MB["phone"]), seconds=240.0)
    assert bounds["M"].memory_mb == HARDWARE_MEMORY_MB["raspberry-pi"]
    assert bounds["L"].memory_mb == HARDWARE_MEMORY_MB["workstation"]
    assert set(HARDWARE_MEMORY_MB) == set(get_args(HardwareClass))


def test_implausible_telemetry_is_stored_flagged_and_reported_as_such(tmp_path: Path) -> None:
    # Prepare: a recorder with its default bounds (any device, a day) and one liar
    store = RunStore(tmp_path / "run")
    write_metrics(
        store,
        [{"round": 1, "prototype": p, "test_accuracy": 50.0, "seed": 0} for p in ("S", "L")],
    )
    recorder = TelemetryRecorder(store, clock=lambda: 1.0)
    honest = header(1, "S-000", "S", train_s=10.0, rss=300.0)
    lying = header(1, "L-000", "L", train_s=10.0, rss=300.0).model_copy(update={"telemetry": LIAR})
    # Execute
    recorder.accepted(honest)
    recorder.accepted(lying)
    rep = build_report(store.root)
    # Assert: the log keeps the claim apart from the measurements
    record = next(e for e in store.telemetry() if e.get("agent_id") == "L-000")
    assert record["implausible"] == {"train_s": 1e9, "peak_rss_mb": 1e9, "deadline_slack_s": -1e9}
    assert record["telemetry"]["rss_limit_mb"] == 512.0
    assert all(k not in record["telemetry"] for k in record["implausible"])
    assert "implausible" not in next(e for e in store.telemetry() if e.get("agent_id") == "S-000")
    # the report: no 1e9 among the measurements, the claim shown flagged
    liar = next(a for a in rep["agents"] if a["agent_id"] == "L-000")
    assert liar["peak_rss_mb"] is None and liar["mean_train_s"] is None
    assert liar["min_slack_s"] is None
    assert liar["implausible"] == ["deadline_slack_s=-1e+09", "peak_rss_mb=1e+09", "train_s=1e+09"]
    assert rep["devices"]["L"]["train_s"] == [] and rep["devices"]["L"]["peak_rss_mb"] == []
    assert rep["devices"]["S"]["train_s"] == [10.0]
    assert "implausible (not measurements)" in render_html(rep)


def test_metrics_count_implausible_values_by_field() -> None:
    metrics = PrometheusMetrics(["S", "L"], {"S": Plausibility(memory_mb=768.0, seconds=240.0)})
    metrics.accepted(header(1, "S-000", "S", train_s=10.0, rss=800.0))  # over the phone's 768
    metrics.accepted(header(1, "L-000", "L", train_s=10.0, rss=800.0))  # L: any device
    metrics.registered("L-001", "L", LIAR)
    value = metrics.registry.get_sample_value
    assert value("takfl_telemetry_implausible_total", {"field": "peak_rss_mb"}) == 2.0
    assert value("takfl_telemetry_implausible_total", {"field": "train_s"}) == 1.0
    assert ANY_DEVICE.memory_mb == max(HARDWARE_MEMORY_MB.values())
