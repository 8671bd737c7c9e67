"""``telemetry.jsonl`` grows by appends in O(record): no rewrite of the file per record,
durable on return, and a line torn by a crash is skipped without losing the next one."""

from __future__ import annotations

import os
from pathlib import Path

from coordinator.store import TELEMETRY_FILE, RunStore


def test_appends_write_in_place_without_rewriting(tmp_path: Path) -> None:
    # Prepare
    store = RunStore(tmp_path)
    store.append_telemetry([{"kind": "presence", "n": 0}])
    path = tmp_path / TELEMETRY_FILE
    inode, size = os.stat(path).st_ino, path.stat().st_size
    # Execute
    for n in range(1, 200):
        store.append_telemetry([{"kind": "presence", "n": n}])
    # Assert: the same file, grown by exactly the records (no copy renamed over it)
    assert os.stat(path).st_ino == inode
    assert path.stat().st_size == size * 200 + sum(len(str(n)) - 1 for n in range(200))
    assert [r["n"] for r in store.telemetry()] == list(range(200))


def test_a_torn_last_line_is_skipped_and_the_next_record_kept(tmp_path: Path) -> None:
    # Prepare: a kill in the middle of an append left half a line
    store = RunStore(tmp_path)
    store.append_telemetry([{"kind": "register", "agent_id": "a1"}])
    with open(tmp_path / TELEMETRY_FILE, "ab") as f:
        f.write(b'{"kind": "update", "agent_id": "a')
    # Execute
    store.append_telemetry([{"kind": "round", "round": 1}])
    # Assert
    assert store.telemetry() == [
        {"kind": "register", "agent_id": "a1"},
        {"kind": "round", "round": 1},
    ]
