"""A/B slots: a release goes into the slot not serving, the switch is one rename, the
previous release stays whole on disk, and reopening checks what is served."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from edge_agent.deploy.slots import (
    ACTIVE_FILE,
    METADATA_FILE,
    REFERENCE_FILE,
    SlotError,
    SlotRecord,
    SlotStore,
    check_file_name,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def release_files(version: int) -> dict[str, bytes]:
    return {
        METADATA_FILE: f'{{"release": {version}}}'.encode(),
        f"S-round-{version}-fp32.onnx": f"model {version}".encode() * 100,
        REFERENCE_FILE: f"reference {version}".encode(),
    }


def install(store: SlotStore, version: int) -> SlotRecord:
    """Stage, fill and switch to release ``version`` as the installer does."""
    files = release_files(version)
    model = f"S-round-{version}-fp32.onnx"
    missing = store.stage({model: sha(files[model]), REFERENCE_FILE: sha(files[REFERENCE_FILE])})
    for name in missing:
        store.put(name, files[name])
    store.put_metadata(files[METADATA_FILE])
    record = SlotRecord(
        slot=store.staging_slot(),
        version=version,
        digest=sha(files[METADATA_FILE]),
        model=model,
        model_sha256=sha(files[model]),
        reference_sha256=sha(files[REFERENCE_FILE]),
    )
    store.switch(record)
    return record


def test_a_fresh_device_installs_into_slot_a_and_reopens_on_it(tmp_path: Path) -> None:
    # Prepare
    store = SlotStore(tmp_path, "S")
    assert store.open() is None and store.staging_slot() == "a"
    # Execute
    install(store, 1)
    reopened = SlotStore(tmp_path, "S").open()
    # Assert
    assert reopened is not None
    assert reopened.record.slot == "a" and reopened.record.version == 1
    assert reopened.model_path.read_bytes() == release_files(1)["S-round-1-fp32.onnx"]
    assert reopened.metadata == release_files(1)[METADATA_FILE]
    assert reopened.reference == release_files(1)[REFERENCE_FILE]


def test_the_next_release_goes_to_the_other_slot_and_the_previous_stays_whole(
    tmp_path: Path,
) -> None:
    # Prepare
    store = SlotStore(tmp_path, "S")
    store.open()
    first = install(store, 1)
    # Execute
    second = install(store, 2)
    # Assert: b serves, a still holds release 1 intact and is recorded as previous
    assert (first.slot, second.slot) == ("a", "b")
    active = json.loads((tmp_path / "S" / ACTIVE_FILE).read_text())
    assert active["slot"] == "b" and active["version"] == 2
    assert active["previous"]["slot"] == "a" and active["previous"]["version"] == 1
    slot_a = tmp_path / "S" / "slots" / "a"
    assert sorted(p.name for p in slot_a.iterdir()) == sorted(release_files(1))
    assert store.staging_slot() == "a"


def test_staging_reuses_held_artifacts_and_clears_the_rest(tmp_path: Path) -> None:
    # Prepare: 1 in a, 2 in b (active)
    store = SlotStore(tmp_path, "S")
    store.open()
    install(store, 1)
    install(store, 2)
    one, two = release_files(1), release_files(2)
    # Execute: a release of model 1 with reference 2 (both held, one in each slot)
    missing = store.stage(
        {
            "S-round-1-fp32.onnx": sha(one["S-round-1-fp32.onnx"]),
            "ref.bin": sha(two[REFERENCE_FILE]),
        }
    )
    # Assert: nothing to fetch; slot a holds exactly those two files now
    assert missing == []
    slot_a = tmp_path / "S" / "slots" / "a"
    assert sorted(p.name for p in slot_a.iterdir()) == ["S-round-1-fp32.onnx", "ref.bin"]
    assert (slot_a / "ref.bin").read_bytes() == two[REFERENCE_FILE]
    assert store.active is not None and store.active.record.version == 2  # untouched


def test_a_damaged_active_slot_falls_back_to_the_previous_release(tmp_path: Path) -> None:
    # Prepare: 1 in a, 2 in b; one byte of release 2's model flipped on disk
    store = SlotStore(tmp_path, "S")
    store.open()
    install(store, 1)
    install(store, 2)
    model = tmp_path / "S" / "slots" / "b" / "S-round-2-fp32.onnx"
    data = bytearray(model.read_bytes())
    data[10] ^= 0xFF
    model.write_bytes(bytes(data))
    # Execute
    reopened = SlotStore(tmp_path, "S")
    active = reopened.open()
    # Assert: release 1 serves again, recorded as active with no previous
    assert active is not None and active.record.version == 1 and active.record.slot == "a"
    doc = json.loads((tmp_path / "S" / ACTIVE_FILE).read_text())
    assert doc["slot"] == "a" and doc["previous"] is None
    assert reopened.staging_slot() == "b"


def test_with_both_slots_damaged_nothing_is_served(tmp_path: Path) -> None:
    store = SlotStore(tmp_path, "S")
    store.open()
    install(store, 1)
    install(store, 2)
    (tmp_path / "S" / "slots" / "b" / REFERENCE_FILE).unlink()
    (tmp_path / "S" / "slots" / "a" / METADATA_FILE).write_bytes(b"{}")

    assert SlotStore(tmp_path, "S").open() is None


def test_open_removes_temp_files_of_interrupted_writes(tmp_path: Path) -> None:
    store = SlotStore(tmp_path, "S")
    store.open()
    install(store, 1)
    leftover = tmp_path / "S" / "slots" / "b" / ".S-round-2-fp32.onnx.abc123.onnx"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half a model")

    SlotStore(tmp_path, "S").open()

    assert not leftover.exists()


def test_switch_refuses_a_staging_slot_that_does_not_hold_the_release(tmp_path: Path) -> None:
    # Prepare: staging slot filled, but the reference missing
    store = SlotStore(tmp_path, "S")
    store.open()
    files = release_files(1)
    store.stage({"S-round-1-fp32.onnx": sha(files["S-round-1-fp32.onnx"])})
    store.put("S-round-1-fp32.onnx", files["S-round-1-fp32.onnx"])
    store.put_metadata(files[METADATA_FILE])
    record = SlotRecord(
        slot="a",
        version=1,
        digest=sha(files[METADATA_FILE]),
        model="S-round-1-fp32.onnx",
        model_sha256=sha(files["S-round-1-fp32.onnx"]),
        reference_sha256=sha(files[REFERENCE_FILE]),
    )
    # Execute / Assert
    with pytest.raises(SlotError):
        store.switch(record)
    assert not (tmp_path / "S" / ACTIVE_FILE).exists() and store.active is None


def test_trust_only_moves_forward_and_never_below_the_active_release(tmp_path: Path) -> None:
    store = SlotStore(tmp_path, "S")
    store.open()
    assert store.trusted() == (0, None)
    store.trust(3, "c" * 64)
    store.trust(2, "b" * 64)
    assert store.trusted() == (3, "c" * 64)
    (tmp_path / "S" / "trusted.json").unlink()
    install(store, 5)
    assert store.trusted()[0] == 5


@pytest.mark.parametrize("name", ["../escape.onnx", ".hidden", "metadata.json", "a/b.onnx", ""])
def test_slot_file_names_cannot_escape_or_shadow_the_slot_files(name: str) -> None:
    with pytest.raises(SlotError):
        check_file_name(name)
