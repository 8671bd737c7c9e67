"""``telemetry.jsonl`` grows by appends in O(record): no rewrite of the file per record,
durable on return, and a line torn by a crash is skipped without losing the next one; the
writer thread appends in batches, in order, so the recorder never waits for the disk."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from coordinator.store import TELEMETRY_FILE, RunStore
from coordinator.telemetry_log import TelemetryRecorder, TelemetryWriter


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


class HeldStore:
    """A store whose first append waits for ``release``: what the writer batches meanwhile."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.batches: list[list[dict[str, Any]]] = []

    def append_telemetry(self, records: list[dict[str, Any]]) -> None:
        if not self.batches:
            self.release.wait(10)
        self.batches.append(list(records))


def test_the_writer_batches_what_arrives_while_it_writes_and_keeps_order() -> None:
    # Prepare
    store = HeldStore()
    writer = TelemetryWriter(store)  # type: ignore[arg-type]
    writer.append({"n": 0})
    deadline = time.monotonic() + 5
    while writer._pending and time.monotonic() < deadline:  # the first batch is being written
        time.sleep(0.01)

    # Execute
    for n in range(1, 101):
        writer.append({"n": n})
    store.release.set()
    flushed = writer.flush(10)
    writer.close()

    # Assert
    assert flushed
    assert [len(b) for b in store.batches] == [1, 100]
    assert [r["n"] for b in store.batches for r in b] == list(range(101))


def test_a_recorder_with_a_writer_never_waits_for_the_disk(tmp_path: Path) -> None:
    # Prepare
    held = HeldStore()
    writer = TelemetryWriter(held)  # type: ignore[arg-type]
    recorder = TelemetryRecorder(RunStore(tmp_path), clock=lambda: 1.0, writer=writer)

    # Execute: the disk is stuck on the first record; the recorder goes on
    start = time.monotonic()
    for n in range(50):
        recorder.presence(f"a{n}", "S", True)
    took = time.monotonic() - start
    held.release.set()
    writer.close()

    # Assert
    assert took < 2.0
    assert sum(len(b) for b in held.batches) == 50
    assert not (tmp_path / TELEMETRY_FILE).exists()  # everything went through the writer
