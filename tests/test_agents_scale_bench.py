"""Smoke test of benchmarks/agents_scale.py: five real agents against a real Mosquitto,
one round, and the JSON record it writes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.brokers import SKIP_NO_MOSQUITTO

pytestmark = [pytest.mark.mosquitto, SKIP_NO_MOSQUITTO]

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "agents_scale.py"
N = 5
RECORD_FIELDS = {
    "command",
    "environment",
    "options",
    "federation",
    "results",
    "memory_slopes",
    "goals",
}
ROUND_FIELDS = {"round", "wall_s", "received", "sampled", "timings"}
RESULT_FIELDS = {
    "agents",
    "workers",
    "status",
    "register_s",
    "registered",
    "reregister_s",
    "rounds",
    "round_s_median",
    "per_agent_ms",
    "rss_setup_mb",
    "rss_peak_mb",
    "rss_growth_mb",
    "tracemalloc_peak_mb",
    "global_blob_bytes",
    "update_blob_bytes",
    "parameters",
    "transport",
    "agent_counters",
    "dropped",
    "status_s",
    "telemetry_bytes_per_record",
    "load_before",
}


def load_benchmark() -> ModuleType:
    """The script as a module, loaded from its file (as `python benchmarks/...` runs it)."""
    spec = importlib.util.spec_from_file_location("agents_scale", SCRIPT)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {SCRIPT}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_five_agents_register_and_answer_one_round(tmp_path: Path) -> None:
    # Prepare
    bench = load_benchmark()
    opts = bench.ScaleOptions(
        rounds=1, register_timeout_s=30.0, round_timeout_s=30.0, startup_timeout_s=60.0
    )
    output = tmp_path / "agents_scale.json"

    # Execute
    record = bench.run([N], opts, output, command="test", report=lambda _line: None)

    # Assert
    written = json.loads(output.read_text())
    assert written == json.loads(json.dumps(record))
    assert set(written) >= RECORD_FIELDS
    (result,) = written["results"]
    assert "error" not in result, result.get("error")
    assert set(result) >= RESULT_FIELDS
    assert result["status"] == "ok"
    assert result["registered"] == N and result["agents_connected"] == N
    assert result["reregistered"] == N
    (round0,) = result["rounds"]
    assert set(round0) >= ROUND_FIELDS
    assert round0["received"] == round0["sampled"] == N
    assert result["transport"]["accepted"] == N and not result["transport"]["refused"]
    assert result["agent_counters"]["answered"] == 2 * N  # the timed round and the traced one
    assert result["tracemalloc_round_received"] == N
    assert result["parameters"] == 610
    assert result["rss_peak_mb"] >= result["rss_setup_mb"] > 0
    assert result["per_agent_ms"] == pytest.approx(result["round_s_median"] * 1000 / N)
    assert result["dropped"] == 0 and result["status_online"] == N
    assert result["telemetry_records"] >= 3 * N  # registration, presence, update
    assert written["goals"]["dropped"]["met"]


def test_json_keys_of_any_kind_are_written() -> None:
    # Prepare: a record whose timings are keyed by (round, prototype)
    control = sys.modules[load_benchmark().Child.__module__]
    record = {"timings": {(0, "S"): 1.5, 3: {"x": (1, 2)}}}

    # Execute
    text = json.dumps(control.jsonable(record))

    # Assert
    assert json.loads(text) == {"timings": {"0/S": 1.5, "3": {"x": [1, 2]}}}


def test_synthetic_shards_need_no_data_pool() -> None:
    # Prepare
    bench = load_benchmark()

    # Execute
    sizes = [bench.synthetic_samples(i) for i in range(10_000)]

    # Assert: any number of agents gets a shard of 8 to 71 samples
    assert min(sizes) == 8 and max(sizes) == 71


def test_perturbation_is_deterministic_small_and_keeps_integers() -> None:
    # Prepare
    bench = load_benchmark()
    state = {"w": torch.zeros(3, 4), "count": torch.tensor(7)}

    # Execute
    a, b, c = bench.perturbed(state, 1), bench.perturbed(state, 1), bench.perturbed(state, 2)

    # Assert
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])
    assert 0 < a["w"].abs().max() <= bench.PERTURBATION
    assert torch.equal(a["count"], state["count"])
