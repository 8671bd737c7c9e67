"""``takfl-coordinator status --broker`` shows what each agent's local inference service
reported with its retained status."""

from __future__ import annotations

import subprocess
import sys

import pytest

from coordinator.status import (
    agent_rows,
    plain_table,
    presence_summary,
    seen_status,
    serving_summary,
    wait_quiet,
)
from takfl.wire.messages import InferenceStatus, Status, encode_message


def test_a_status_with_an_inference_block_shows_the_serving_counters() -> None:
    # Prepare
    block = InferenceStatus(
        requests=120, errors=2, latency_p50_ms=0.5, latency_p99_ms=1.25, active_version=4
    )
    serving = Status(agent_id="M-001", state="online", time=1.0e9, inference=block)
    plain = Status(agent_id="S-000", state="offline", time=1.0e9)
    seen: dict[str, dict[str, str]] = {}

    # Execute
    seen_status(seen, encode_message(serving))
    seen_status(seen, encode_message(plain))
    seen_status(seen, b"not a status")

    # Assert
    assert seen["M-001"]["serving"] == "release 4: 120 requests, 2 errors, p50 0.50 / p99 1.25 ms"
    assert seen["M-001"]["state"] == "online"
    assert "serving" not in seen["S-000"] and seen["S-000"]["state"] == "offline"
    assert set(seen) == {"M-001", "S-000"}


def test_a_service_with_no_release_and_no_requests_says_so() -> None:
    assert serving_summary(InferenceStatus(requests=0, errors=0)) == (
        "no release: 0 requests, 0 errors"
    )


class FakeTime:
    """A clock that moves only when slept on."""

    def __init__(self) -> None:
        self.now = 100.0

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_presence_collection_stops_once_the_retained_statuses_stop() -> None:
    # Prepare: statuses keep coming for the first 0.5 s, then none
    t = FakeTime()

    def latest() -> float:
        return min(t.now, 100.5)

    # Execute
    waited = wait_quiet(latest, listen_s=2.0, quiet_s=0.3, clock=t.clock, sleep=t.sleep)

    # Assert
    assert 0.8 <= waited < 0.9


def test_presence_collection_waits_the_whole_listen_time_when_nothing_comes() -> None:
    # Prepare
    t = FakeTime()

    # Execute
    waited = wait_quiet(lambda: None, listen_s=2.0, quiet_s=0.3, clock=t.clock, sleep=t.sleep)

    # Assert
    assert waited == pytest.approx(2.0)


def test_the_status_command_starts_without_torch() -> None:
    # Prepare: a fresh interpreter, as an operator's shell starts one
    code = "import sys, coordinator.cli, coordinator.status; print('torch' in sys.modules)"

    # Execute
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )

    # Assert: torch alone takes seconds to import; status answers within two
    assert out.stdout.strip() == "False"


def test_a_large_fleet_is_listed_as_plain_text_with_a_summary() -> None:
    # Prepare
    seen = {
        "S-001": {"state": "online", "prototype": "S", "last_seen": "t1"},
        "S-000": {"state": "offline", "prototype": "S", "last_seen": "t0"},
        "M-000": {"state": "online", "prototype": "M", "serving": "no release: 0 requests"},
    }

    # Execute
    rows = agent_rows(seen)
    text = plain_table(rows)
    summary = presence_summary(seen)

    # Assert
    assert [r[0] for r in rows] == ["M-000", "S-000", "S-001"]
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["agent", "prototype", "state", "last"]
    assert lines[2].startswith("M-000  M          online") and lines[2].endswith("0 requests")
    assert lines[4].split() == ["S-001", "S", "online", "t1"]
    assert summary == {
        "M": {"online": 1, "offline": 0, "serving": 1},
        "S": {"online": 1, "offline": 1},
    }
