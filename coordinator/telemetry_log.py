"""The run's telemetry log, ``RUN/telemetry.jsonl``: one JSON object per line, appended
at the end of the file (whole lines; see below), never rewritten.

Every record has ``kind`` and ``time`` (unix seconds, coordinator clock). Kinds::

    register  agent_id, prototype, round (the coordinator's open round, 0 before round 1),
              telemetry (object or null: takfl.wire.telemetry.Telemetry, as received but
              for implausible values), implausible (field -> value; only when any)
    presence  agent_id, prototype, online (bool); written when the state changes
    update    agent_id, prototype, round, num_samples, upload_bytes (the delta blob),
              compression, telemetry (object or null), implausible (as for register)
    refusal   agent_id, prototype (or null), round (or null), reason (a Refusal value)
    round     round, duration_s, sampled / answered / late / missing: prototype -> [agent ids],
              refused: reason -> count (this round's refusals of updates),
              bytes_down / bytes_up: prototype -> bytes (global models in tasks, accepted
              update blobs)

``late`` are sampled agents whose update was refused as expired or for a closed round;
``missing`` are sampled agents that neither answered nor were late. Everything in a
record was validated on receipt (telemetry is bounded by its schema); values no device
of the tier can have measured (:func:`plausibility`: memory over the tier's hardware
class, times or deadline slack past the round's deadline x
:data:`DEADLINE_FACTOR`) are moved out of ``telemetry`` into ``implausible``, so
nothing reads them as measurements. The log stays
bounded by agents x rounds: a registration is written again only when the agent's
platform changed (an agent re-registers on every reconnect), and at most
``MAX_REFUSALS`` refusals per agent and round are written (the round record counts all).

Records are appended in O(record) (:meth:`RunStore.append_telemetry`: written at the
end of the file and fsynced). With a :class:`TelemetryWriter`, as ``serve`` runs it,
the appends happen on a thread of their own, in batches: the transport's dispatcher
thread, which calls the recorder for every registration, presence change and update,
never waits for the disk, and a thousand records arriving together cost one write and
one fsync, not a thousand.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from coordinator.observe import LATE_REASONS, FleetObserver
from coordinator.store import RunStore
from takfl.config import FederationConfig, prototype_profile
from takfl.config.profile import HARDWARE_MEMORY_MB
from takfl.wire.messages import UpdateHeader
from takfl.wire.telemetry import Plausibility, Telemetry, implausible

log = logging.getLogger(__name__)

MAX_REFUSALS = 16  # refusal records per agent and round (the round record counts every one)
DEADLINE_FACTOR = 2.0  # times and deadline slack within the round's deadline x this
# for a tier without its own bounds: the largest device, a day
ANY_DEVICE = Plausibility(memory_mb=float(max(HARDWARE_MEMORY_MB.values())), seconds=86_400.0)


def plausibility(
    cfg: FederationConfig, deadline_s: float, factor: float = DEADLINE_FACTOR
) -> dict[str, Plausibility]:
    """prototype -> what its devices can report: memory up to its hardware class's
    (:data:`HARDWARE_MEMORY_MB`), times and slack within ``deadline_s x factor``.

    Not the profile's ``memory_limit_mb``: that limit is a soft one the agent checks
    after each task (``edge_agent.limits.over_memory``), so an honest agent can report
    a peak above it; no honest device reports more memory than its class has."""
    out = {}
    for p in cfg.prototypes:
        memory = HARDWARE_MEMORY_MB[prototype_profile(cfg, p.name).hardware_class]
        out[p.name] = Plausibility(memory_mb=float(memory), seconds=deadline_s * factor)
    return out


def screen(
    telemetry: Telemetry | None, bounds: Plausibility
) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """The telemetry as JSON without its implausible values, and those values."""
    if telemetry is None:
        return None, {}
    flagged = implausible(telemetry, bounds)
    data = telemetry.model_dump(mode="json")
    return {k: v for k, v in data.items() if k not in flagged}, flagged


class TelemetryWriter:
    """Appends telemetry records to a run store from a thread of its own, in batches
    (whatever arrived while the previous batch was being written). Order is kept;
    :meth:`flush` waits until everything handed in is on disk; :meth:`close` flushes
    and stops the thread (records handed in after that are written at once)."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.batches = 0  # appends made (one write and fsync each)
        self._pending: list[dict[str, Any]] = []
        self._writing = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="telemetry-writer", daemon=True)
        self._thread.start()

    def append(self, record: dict[str, Any]) -> None:
        with self._cond:
            if not self._closed:
                self._pending.append(record)
                self._cond.notify_all()
                return
        self.store.append_telemetry([record])

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
                self._writing = True
            try:
                self.store.append_telemetry(batch)
                self.batches += 1
            except OSError:
                log.exception("telemetry: %d record(s) not written", len(batch))
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every record handed in is written; False after ``timeout`` s."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._writing, timeout)

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)


class _Round:
    def __init__(self, plan: Mapping[str, Sequence[str]]) -> None:
        self.plan = {p: sorted(ids) for p, ids in plan.items()}
        self.answered: dict[str, set[str]] = defaultdict(set)
        self.late: dict[str, set[str]] = defaultdict(set)
        self.refused: Counter[str] = Counter()
        self.bytes_down: Counter[str] = Counter()
        self.bytes_up: Counter[str] = Counter()


class TelemetryRecorder(FleetObserver):
    """Writes the telemetry log of one run as events arrive (thread-safe)."""

    def __init__(
        self,
        store: RunStore,
        clock: Callable[[], float] = time.time,
        bounds: Mapping[str, Plausibility] | None = None,
        writer: TelemetryWriter | None = None,
    ) -> None:
        """``bounds``: prototype -> :class:`Plausibility` (:func:`plausibility`); other
        prototypes get :data:`ANY_DEVICE`. ``writer``: appends on its own thread (None:
        each record is appended before the call returns)."""
        self.store = store
        self.writer = writer
        self.clock = clock
        self.bounds = dict(bounds or {})
        self._lock = threading.Lock()
        self._round_id = 0
        self._rounds: dict[int, _Round] = {}
        self._online: dict[str, bool] = {}
        self._platforms: dict[str, Any] = {}  # agent -> platform of its last registration
        self._refusals: Counter[tuple[int | None, str]] = Counter()  # (round, agent)

    def _write(self, kind: str, **fields: Any) -> None:
        record = {"kind": kind, "time": self.clock(), **fields}
        if self.writer is not None:
            self.writer.append(record)
        else:
            self.store.append_telemetry([record])

    def _screened(self, prototype: str, telemetry: Telemetry | None) -> dict[str, Any]:
        data, flagged = screen(telemetry, self.bounds.get(prototype, ANY_DEVICE))
        return {"telemetry": data} | ({"implausible": flagged} if flagged else {})

    def _open(self, round_id: int | None) -> _Round | None:
        return self._rounds.get(round_id) if round_id is not None else None

    # -- FleetObserver ------------------------------------------------------------------------
    def registered(self, agent: str, prototype: str, telemetry: Telemetry | None) -> None:
        platform = None if telemetry is None else telemetry.platform
        with self._lock:
            round_id = self._round_id
            if agent in self._platforms and self._platforms[agent] == platform:
                return
            self._platforms[agent] = platform
        self._write(
            "register",
            agent_id=agent,
            prototype=prototype,
            round=round_id,
            **self._screened(prototype, telemetry),
        )

    def presence(self, agent: str, prototype: str, online: bool) -> None:
        with self._lock:
            if self._online.get(agent) == online:
                return
            self._online[agent] = online
        self._write("presence", agent_id=agent, prototype=prototype, online=online)

    def tasks_sent(self, round_id: int, prototype: str, count: int, blob_bytes: int) -> None:
        with self._lock:
            r = self._open(round_id)
            if r is not None:
                r.bytes_down[prototype] += count * blob_bytes

    def accepted(self, header: UpdateHeader) -> None:
        with self._lock:
            r = self._open(header.round_id)
            if r is not None:
                r.answered[header.prototype].add(header.agent_id)
                r.bytes_up[header.prototype] += header.blob.size
        self._write(
            "update",
            agent_id=header.agent_id,
            prototype=header.prototype,
            round=header.round_id,
            num_samples=header.num_samples,
            upload_bytes=header.blob.size,
            compression=header.compression,
            **self._screened(header.prototype, header.telemetry),
        )

    def refused(self, agent: str, prototype: str | None, round_id: int | None, reason: str) -> None:
        with self._lock:
            r = self._open(round_id)
            if r is not None:
                r.refused[reason] += 1
                if reason in LATE_REASONS and prototype is not None:
                    r.late[prototype].add(agent)
            self._refusals[(round_id, agent)] += 1
            if self._refusals[(round_id, agent)] > MAX_REFUSALS:
                return
        self._write("refusal", agent_id=agent, prototype=prototype, round=round_id, reason=reason)

    def round_started(self, round_id: int, plan: Mapping[str, Sequence[str]]) -> None:
        with self._lock:
            self._round_id = round_id
            self._rounds[round_id] = _Round(plan)
            for old in [k for k in self._rounds if k < round_id - 1]:
                del self._rounds[old]  # keep the previous round for its late arrivals
            for key in [k for k in self._refusals if k[0] is not None and k[0] < round_id - 1]:
                del self._refusals[key]

    def round_finished(self, round_id: int, duration_s: float) -> None:
        with self._lock:
            r = self._rounds.get(round_id)
            if r is None:
                return
            record = round_record(r, round_id, duration_s)
        self._write("round", **record)


def round_record(r: _Round, round_id: int, duration_s: float) -> dict[str, Any]:
    """The ``round`` record's fields from a round's bookkeeping."""
    answered = {p: sorted(r.answered.get(p, set()) & set(ids)) for p, ids in r.plan.items()}
    late = {p: sorted(r.late.get(p, set()) - set(answered[p])) for p in r.plan}
    missing = {p: sorted(set(ids) - set(answered[p]) - set(late[p])) for p, ids in r.plan.items()}
    return {
        "round": round_id,
        "duration_s": duration_s,
        "sampled": r.plan,
        "answered": answered,
        "late": late,
        "missing": missing,
        "refused": dict(r.refused),
        "bytes_down": {p: r.bytes_down.get(p, 0) for p in r.plan},
        "bytes_up": {p: r.bytes_up.get(p, 0) for p in r.plan},
    }
