"""Telemetry in signed headers: bounded and validated like everything received."""

from __future__ import annotations

import json

import pytest

from edge_agent.telemetry import platform_info, task_telemetry
from takfl.config.profile import TrainingSpec
from takfl.wire.chunking import blob_ref
from takfl.wire.errors import MalformedMessage
from takfl.wire.messages import UpdateHeader, decode_message, encode_message
from takfl.wire.signing import sign, verify
from takfl.wire.telemetry import MAX_RUNTIMES, Telemetry

SECRET = b"s" * 32


def signed_header(telemetry: Telemetry | None) -> UpdateHeader:
    h = UpdateHeader(
        round_id=3,
        agent_id="S-000",
        prototype="S",
        base_digest="a" * 64,
        blob=blob_ref(b"delta", 1024),
        compression="fp16",
        num_samples=10,
        telemetry=telemetry,
    )
    return sign(h, SECRET)


def test_platform_and_task_telemetry_of_this_machine() -> None:
    info = platform_info()
    assert info.machine and info.system and info.python and info.torch
    assert info.cpus >= 1
    t = task_telemetry(
        info,
        TrainingSpec(memory_limit_mb=512),
        train_s=2.0,
        samples=100,
        bytes_sent=10,
        bytes_received=20,
        retries=1,
        deadline=None,
    )
    assert t.samples_per_s == 50.0 and t.rss_limit_mb == 512.0
    assert t.peak_rss_mb is not None and t.peak_rss_mb > 10  # a torch process
    assert t.threads is not None and t.threads >= 1


def test_telemetry_round_trips_and_is_signed() -> None:
    t = Telemetry(platform=platform_info(), train_s=1.5, peak_rss_mb=300.0, retries=2)
    h = decode_message(UpdateHeader, encode_message(signed_header(t)))
    assert h.telemetry == t and verify(h, SECRET)
    # changing the telemetry breaks the signature
    forged = h.model_copy(update={"telemetry": t.model_copy(update={"train_s": 0.1})})
    assert not verify(forged, SECRET)


@pytest.mark.parametrize(
    "change",
    [
        {"train_s": -1.0},
        {"peak_rss_mb": 1e12},
        {"threads": 0},
        {"bytes_sent": -5},
        {"unknown_field": 1},
        {"platform": {"machine": "x" * 500}},
        {"platform": {"runtimes": {f"rt{i}": "1" for i in range(MAX_RUNTIMES + 1)}}},
        {"platform": {"cpus": "many"}},
    ],
)
def test_out_of_bounds_telemetry_is_refused(change: dict) -> None:  # type: ignore[type-arg]
    data = json.loads(encode_message(signed_header(Telemetry(train_s=1.0))))
    data["telemetry"] = {**data["telemetry"], **change}
    with pytest.raises(MalformedMessage, match="telemetry"):
        decode_message(UpdateHeader, json.dumps(data).encode())


def test_non_finite_telemetry_is_refused() -> None:
    data = encode_message(signed_header(Telemetry(train_s=1.0))).replace(
        b'"train_s":1.0', b'"train_s":NaN'
    )
    with pytest.raises(MalformedMessage):
        decode_message(UpdateHeader, data)
