"""The emulated arm64 board (benchmarks/arm64_board.py): the /proc/cpuinfo it shows instead
of the x86 host's (which qemu-user 7.2 passes through), and the profiles its agents run."""

from __future__ import annotations

import pytest

from benchmarks.arm64_board import (
    EMULATED_INFERENCE_THREADS,
    LATENCY_BUDGET_FACTOR,
    board_cpuinfo,
    emulated_profile,
)


def test_board_cpuinfo_describes_one_cortex_a76_per_cpu() -> None:
    text = board_cpuinfo(3)

    entries = [e for e in text.split("\n\n") if e.strip()]
    assert [e.splitlines()[0] for e in entries] == [f"processor\t: {n}" for n in range(3)]
    for entry in entries:
        fields = dict(line.split(":", 1) for line in entry.splitlines())
        assert fields["CPU implementer\t"].strip() == "0x41"  # Arm
        assert fields["CPU part\t"].strip() == "0xd0b"  # Cortex-A76
        assert {"asimd", "atomics", "asimddp"} <= set(fields["Features\t"].split())
    assert "vendor_id" not in text and "x86" not in text


def test_board_cpuinfo_needs_a_cpu() -> None:
    with pytest.raises(ValueError, match="at least one CPU"):
        board_cpuinfo(0)


def test_emulated_profile_runs_inference_on_one_thread_with_a_scaled_budget() -> None:
    raw = {
        "name": "raspberry-pi-4",
        "training": {"threads": 4},
        "inference": {"runtime": "ai-edge-litert", "threads": 4, "latency_budget_ms": 250},
    }

    got = emulated_profile(raw)

    assert got["inference"] == {
        "runtime": "ai-edge-litert",
        "threads": EMULATED_INFERENCE_THREADS,
        "latency_budget_ms": 250 * LATENCY_BUDGET_FACTOR,
    }
    assert got["training"] == {"threads": 4} and got["name"] == "raspberry-pi-4"
    assert raw["inference"]["threads"] == 4  # the bundled profile's dict is left alone


def test_emulated_profile_without_a_budget_keeps_none() -> None:
    got = emulated_profile({"name": "x", "inference": {"threads": 8}})

    assert got["inference"] == {"threads": EMULATED_INFERENCE_THREADS}
