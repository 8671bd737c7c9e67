"""The run store: reads and writes a run directory (layout and state schema in
``takfl.run_layout``): state, per-round global models, metrics, telemetry, pending updates.

Every write goes to a temporary file in the same folder and is renamed into
place, so a coordinator killed at any point leaves either the old or the new
file, never half of one; the exception is ``telemetry.jsonl``, appended in place
(a torn last line after a kill is skipped on reading). A round is committed by
writing ``state.json`` (which carries the round's metrics records);
``metrics.jsonl`` is then brought in line with it, idempotently per (round,
prototype), and again on resume, so the two never disagree after a restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, load_file

from coordinator.transport.base import ClientUpdate
from takfl import run_layout
from takfl.checkpoint import CheckpointMeta, save_checkpoint
from takfl.config import FederationConfig
from takfl.files import atomic_write_bytes
from takfl.run_layout import (
    CONFIG_FILE,
    METRICS_FILE,
    STATE_FILE,
    TELEMETRY_FILE,
    RunLayoutError,
    RunState,
)
from takfl.state import State, non_finite_entry

log = logging.getLogger(__name__)


class RunStoreError(RuntimeError):
    """The run directory is missing, incomplete or inconsistent."""


class RunStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._append_lock = threading.Lock()  # appends come from more than one thread

    # -- paths --------------------------------------------------------------
    def model_path(self, prototype: str, round_id: int) -> Path:
        return run_layout.model_path(self.root, prototype, round_id)

    def pending_dir(self, round_id: int) -> Path:
        return run_layout.pending_dir(self.root, round_id)

    @property
    def exports_dir(self) -> Path:
        return run_layout.exports_dir(self.root)

    # -- state and config ---------------------------------------------------
    def exists(self) -> bool:
        return (self.root / STATE_FILE).is_file()

    def read_state(self) -> RunState:
        """The committed state; :class:`RunStoreError` when missing or malformed."""
        try:
            return run_layout.read_run_state(self.root)
        except RunLayoutError as e:
            raise RunStoreError(str(e)) from e

    def state_if_any(self) -> RunState | None:
        """The committed state, None where the directory has none (a simulate output)."""
        return self.read_state() if self.exists() else None

    def write_state(self, state: RunState) -> None:
        atomic_write_bytes(self.root / STATE_FILE, run_layout.encode_run_state(state))

    def write_config(self, cfg: FederationConfig) -> None:
        text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        atomic_write_bytes(self.root / CONFIG_FILE, text.encode())

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    # -- models -------------------------------------------------------------
    def save_global(self, meta: CheckpointMeta, state: State) -> str:
        """Write the prototype's checkpoint of ``meta.round``; returns its SHA-256 (hex),
        to be recorded in the run state."""
        return save_checkpoint(self.model_path(meta.prototype, meta.round), state, meta)

    def load_global(self, prototype: str, round_id: int, sha256: str | None = None) -> State:
        """The checkpoint, checked: its SHA-256 equal to ``sha256`` (the digest the run
        state recorded; None for runs from before digests were kept), readable, every
        floating value finite. Anything else is a :class:`RunStoreError` naming the file."""
        path = self.model_path(prototype, round_id)
        if not path.is_file():
            raise RunStoreError(f"missing global model {path}")
        data = path.read_bytes()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise RunStoreError(
                f"{path} does not match the SHA-256 recorded in {STATE_FILE} (corrupt, "
                "truncated or replaced); restore it from a backup or start a new run"
            )
        try:
            state = load(data)
        except (SafetensorError, ValueError) as e:
            raise RunStoreError(f"{path} is not a readable checkpoint ({e})") from e
        if (name := non_finite_entry(state)) is not None:
            raise RunStoreError(f"{path}: tensor {name} holds NaN or inf; refusing to resume")
        return state

    # -- metrics ------------------------------------------------------------
    def commit_metrics(self, round_id: int, records: list[dict[str, Any]]) -> None:
        """Make ``metrics.jsonl`` hold ``records`` as round ``round_id``'s lines: lines of
        later rounds and earlier lines with the same (round, prototype) are dropped, so
        calling it again (e.g. on resume) changes nothing."""
        keys = {_metrics_key(r) for r in records}
        kept = [
            r
            for r in self._metrics_lines()
            if int(r.get("round", 0)) <= round_id and _metrics_key(r) not in keys
        ]
        body = "".join(json.dumps(r) + "\n" for r in [*kept, *records]).encode()
        atomic_write_bytes(self.root / METRICS_FILE, body)

    def _metrics_lines(self) -> list[dict[str, Any]]:
        return self._read_jsonl(METRICS_FILE)

    def metrics(self) -> list[dict[str, Any]]:
        """Metrics of committed rounds, one record per (round, prototype) (the last one)."""
        state = self.state_if_any()
        committed = state["round"] if state is not None else None
        latest: dict[tuple[int, str], dict[str, Any]] = {}
        for r in self._metrics_lines():
            if committed is None or int(r.get("round", 0)) <= committed:
                latest[_metrics_key(r)] = r
        pending = (state.get("round_metrics") if state is not None else None) or []
        for r in pending:  # committed, file not yet written
            latest.setdefault(_metrics_key(r), r)
        return sorted(latest.values(), key=_metrics_key)

    def metrics_records(self) -> list[dict[str, Any]]:
        """Every readable line of ``metrics.jsonl`` as written (several algorithms and
        seeds in a ``simulate --compare`` output; see :meth:`metrics` for a served run)."""
        return self._metrics_lines()

    # -- telemetry ----------------------------------------------------------
    def _append_jsonl(self, name: str, records: list[dict[str, Any]]) -> None:
        """Append JSON lines in O(size of the records): written at the end of the file,
        flushed and fsynced before returning. A crash mid-append can leave a torn last
        line, which :meth:`_read_jsonl` skips; the next append starts on a line of its own
        so it is not glued to the torn one."""
        path = self.root / name
        body = "".join(json.dumps(r) + "\n" for r in records).encode()
        with self._append_lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a+b") as f:
                size = os.fstat(f.fileno()).st_size
                if size and os.pread(f.fileno(), 1, size - 1) != b"\n":
                    body = b"\n" + body
                f.write(body)
                f.flush()
                os.fsync(f.fileno())

    def _read_jsonl(self, name: str) -> list[dict[str, Any]]:
        path = self.root / name
        if not path.is_file():
            return []
        out = []
        for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def append_telemetry(self, records: list[dict[str, Any]]) -> None:
        """Append telemetry events (schema: ``coordinator.telemetry_log``)."""
        self._append_jsonl(TELEMETRY_FILE, records)

    def telemetry(self) -> list[dict[str, Any]]:
        return self._read_jsonl(TELEMETRY_FILE)

    # -- pending updates of the open round ----------------------------------
    def save_pending(self, upd: ClientUpdate) -> None:
        from safetensors.torch import save

        meta = {
            "prototype": upd.prototype,
            "client_id": upd.client_id,
            "round": str(upd.round_id),
            "num_samples": str(upd.num_samples),
            "metrics": json.dumps(upd.metrics),
        }
        blob = save({k: v.contiguous() for k, v in upd.state.items()}, metadata=meta)
        atomic_write_bytes(self.pending_dir(upd.round_id) / f"{upd.client_id}.safetensors", blob)

    def pending(self, round_id: int) -> list[ClientUpdate]:
        """Persisted updates of the open round; an unreadable file is skipped (logged)."""
        folder = self.pending_dir(round_id)
        out = []
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                upd = ClientUpdate(
                    round_id=int(meta["round"]),
                    prototype=meta["prototype"],
                    client_id=meta["client_id"],
                    num_samples=int(meta["num_samples"]),
                    state=load_file(str(path)),
                    metrics=json.loads(meta.get("metrics", "{}")),
                )
            except (SafetensorError, OSError, KeyError, ValueError) as e:
                log.warning("skipping persisted update %s: unreadable (%s)", path, e)
                continue
            out.append(upd)
        return out

    def clear_pending(self, round_id: int) -> None:
        shutil.rmtree(self.pending_dir(round_id), ignore_errors=True)


def _metrics_key(record: dict[str, Any]) -> tuple[int, str]:
    return int(record.get("round", 0)), str(record.get("prototype", ""))
