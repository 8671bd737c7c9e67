"""``takfl-coordinator status --broker`` shows what each agent's local inference service
reported with its retained status."""

from __future__ import annotations

from coordinator.status import seen_status, serving_summary
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
