"""A real federation (coordinator and agents as processes, embedded broker) with the
field-trial tooling on: Prometheus metrics scraped while it runs, the live status table,
the agents' telemetry in the run store, and the report of the finished run."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from typer.testing import CliRunner

from coordinator.broker.net import free_port
from coordinator.cli import app
from coordinator.report import write_report
from coordinator.testbed import federation, read_state, wait_until
from tests.browser import CHROMIUM, render

pytestmark = pytest.mark.slow
AGENTS = {"S-000", "S-001", "M-000", "M-001", "L-000"}


def scrape(port: int) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def total(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def test_metrics_status_telemetry_and_report(tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    with federation(tmp_path, "embedded", rounds=2) as fed:
        fed.start_all_agents()
        coord = fed.start_coordinator(
            "--deadline",
            "120",
            "--wait-all",
            "300",
            "--metrics-port",
            str(port),
            "--metrics-addr",
            "127.0.0.1",
        )
        seen: dict[str, float] = {}

        def updates_counted() -> bool:
            nonlocal seen
            assert coord.poll() is None, fed.logs()
            try:
                seen = scrape(port)
            except OSError:
                return False
            return total(seen, "takfl_updates_accepted_total") >= 1

        wait_until(updates_counted, 400, "an accepted update in the metrics")
        # scraped during the run: agents online per tier, a round in progress
        assert seen['takfl_agents_online{prototype="S"}'] == 2
        assert seen['takfl_agents_online{prototype="L"}'] == 1
        assert seen["takfl_round"] >= 1
        assert total(seen, "takfl_bytes_sent_total") > 0
        assert total(seen, "takfl_registrations_total") >= 5

        watch = CliRunner().invoke(
            app,
            ["status", "--run-dir", str(fed.run_dir), "--watch", "--times", "1"],
            terminal_width=200,
        )
        assert watch.exit_code == 0, watch.output
        assert "stragglers:" in watch.output
        assert all(a in watch.output for a in AGENTS), watch.output

        def round_one_counted() -> bool:
            nonlocal seen
            assert coord.poll() is None, fed.logs()
            seen = scrape(port)
            return seen["takfl_rounds_completed_total"] >= 1

        wait_until(round_one_counted, 400, "round 1 in the metrics")
        assert seen["takfl_round_duration_seconds_count"] >= 1
        assert total(seen, "takfl_updates_accepted_total") >= 5  # round 1: every agent
        assert total(seen, "takfl_bytes_received_total") > 0
        assert coord.wait(600) == 0, fed.logs()
        assert read_state(fed.run_dir)["phase"] == "finished"

    events = [json.loads(x) for x in (fed.run_dir / "telemetry.jsonl").read_text().splitlines()]
    registrations = [e for e in events if e["kind"] == "register"]
    assert {e["agent_id"] for e in registrations} == AGENTS
    assert all(e["telemetry"]["platform"]["torch"] for e in registrations)
    updates = [e for e in events if e["kind"] == "update"]
    assert len(updates) == 10
    for e in updates:
        t = e["telemetry"]
        assert t["train_s"] > 0 and t["samples_per_s"] > 0
        assert t["peak_rss_mb"] > 10 and t["threads"] == 1
        assert t["bytes_received"] > 0 and t["deadline_slack_s"] > 0
        assert t["platform"]["python"]
    rounds = [e for e in events if e["kind"] == "round"]
    assert [e["round"] for e in rounds] == [1, 2]
    assert all(sum(map(len, e["answered"].values())) == 5 for e in rounds)
    assert all(e["bytes_up"]["L"] > 0 and e["bytes_down"]["L"] > 0 for e in rounds)

    html, data_path = write_report(fed.run_dir)
    data = json.loads(data_path.read_text())
    assert [t["answered"] for t in data["stragglers"]] == [5, 5]
    assert set(data["devices"]) == {"S", "M", "L"}
    assert {a["agent_id"] for a in data["agents"]} == AGENTS
    if CHROMIUM is not None:  # the page itself is checked in tests/test_report.py too
        assert render(html, tmp_path / "report.png") == []
