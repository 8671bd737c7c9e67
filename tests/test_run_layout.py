"""The run directory's layout and state schema (takfl.run_layout): names, paths, state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.store import RunStore, RunStoreError
from takfl import run_layout
from takfl.run_layout import (
    RunLayoutError,
    checkpoint_round,
    decode_run_state,
    encode_run_state,
    latest_checkpoint,
    read_run_state,
)


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_paths_follow_the_documented_layout(tmp_path: Path) -> None:
    # Prepare / Execute
    model = run_layout.model_path(tmp_path, "M", 7)
    pending = run_layout.pending_dir(tmp_path, 3)
    exports = run_layout.exports_dir(tmp_path, "M")

    # Assert
    assert model == tmp_path / "models" / "M" / "round-7.safetensors"
    assert pending == tmp_path / "pending" / "round-3"
    assert exports == tmp_path / "exports" / "M"
    assert run_layout.export_report_path(tmp_path) == tmp_path / "exports" / "report.json"


def test_the_run_store_uses_the_layout(tmp_path: Path) -> None:
    store = RunStore(tmp_path)

    assert store.model_path("L", 2) == run_layout.model_path(tmp_path, "L", 2)
    assert store.pending_dir(2) == run_layout.pending_dir(tmp_path, 2)
    assert store.exports_dir == run_layout.exports_dir(tmp_path)
    assert store.config_path == tmp_path / run_layout.CONFIG_FILE


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("round-0.safetensors", 0),
        ("round-12.safetensors", 12),
        ("round-x.safetensors", None),
        ("round-3.bin", None),
        ("model.safetensors", None),
    ],
)
def test_checkpoint_round_reads_only_checkpoint_names(name: str, expected: int | None) -> None:
    assert checkpoint_round(Path("models") / "M" / name) == expected


def test_latest_checkpoint_is_the_highest_round_by_number(tmp_path: Path) -> None:
    for r in (1, 2, 10):
        touch(run_layout.model_path(tmp_path, "L", r))
    touch(run_layout.models_dir(tmp_path, "L") / "notes.safetensors")

    latest = latest_checkpoint(tmp_path, "L")

    assert latest.name == "round-10.safetensors"
    assert list(run_layout.checkpoints(tmp_path, "L")) == [1, 2, 10]


def test_a_prototype_without_checkpoints_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RunLayoutError, match=r"no round-<r>\.safetensors checkpoint"):
        latest_checkpoint(tmp_path, "S")


def test_state_round_trips_and_keeps_unknown_keys(tmp_path: Path) -> None:
    # Prepare: a state as the coordinator writes it, plus a key from another version
    state = {
        "round": 2,
        "phase": "collecting",
        "accuracy": {"S": 81.5},
        "lambdas": {"S": {"S": 0.25, "L": 0.75}, "L": None},
        "open_round": {"id": 3, "plan": {"S": ["S-000"]}},
        "checkpoints": {"S": "ab" * 32},
        "agents": ["S-000"],
    }
    (tmp_path / run_layout.STATE_FILE).write_text(json.dumps(state))

    # Execute
    read = read_run_state(tmp_path)

    # Assert
    assert read == state
    assert encode_run_state(read) == json.dumps(state, indent=2, sort_keys=True).encode()


def test_a_minimal_state_is_enough() -> None:
    assert decode_run_state(b'{"round": 0}') == {"round": 0}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"phase": "finished"}', "lacks the 'round' entry"),
        (b'["round"]', "lacks the 'round' entry"),
        (b'{"round": "three"}', "round: Input should be a valid integer"),
        (b'{"round": 1, "accuracy": {"S": "high"}}', "accuracy.S:"),
        (b'{"round": 1, "open_round": {"id": 2}}', "open_round.plan: Field required"),
    ],
)
def test_a_malformed_state_is_refused_naming_the_field(body: bytes, message: str) -> None:
    with pytest.raises(RunLayoutError, match=message):
        decode_run_state(body, "RUN/state.json")


def test_a_folder_without_state_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(RunLayoutError, match="is it a run directory"):
        read_run_state(tmp_path)
    with pytest.raises(RunStoreError, match="is it a run directory"):
        RunStore(tmp_path).read_state()
