"""What ``takfl-coordinator status`` shows: the run's state and agents' presence."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from takfl.mqtt.client import MqttClient, unique_client_id
from takfl.mqtt.url import parse_broker_url
from takfl.wire.errors import WireError
from takfl.wire.messages import InferenceStatus, Status, decode_message
from takfl.wire.topics import Topics, Up


def run_status(run_dir: Path) -> tuple[dict[str, Any], str]:
    """A flat view of state.json plus the fleet (config) name."""
    from coordinator.store import RunStore  # torch: only for a run directory

    store = RunStore(run_dir)
    state = store.read_state()
    view: dict[str, Any] = {
        "round": state.get("round"),
        "phase": state.get("phase"),
        "algorithm": state.get("algorithm"),
        "config": state.get("config"),
    }
    for proto, acc in (state.get("accuracy") or {}).items():
        view[f"accuracy {proto}"] = f"{acc:.2f}%"
    for proto, lam in (state.get("lambdas") or {}).items():
        if lam:
            view[f"lambdas {proto}"] = ", ".join(f"{k}={v:.2f}" for k, v in lam.items())
    privacy = state.get("privacy") or {}
    for proto, rec in (privacy.get("prototypes") or {}).items():
        view[f"epsilon {proto}"] = (
            f"{rec.get('epsilon', 0.0):.3f} of {privacy.get('budget')} at delta "
            f"{privacy.get('delta')} ({privacy.get('mode')})"
        )
    if state.get("updated"):
        view["updated"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state["updated"]))
    return view, str(state.get("config") or "")


def serving_summary(block: InferenceStatus) -> str:
    """One line of an agent's local inference service, from its status."""
    release = "no release" if block.active_version is None else f"release {block.active_version}"
    latency = (
        ""
        if block.latency_p50_ms is None or block.latency_p99_ms is None
        else f", p50 {block.latency_p50_ms:.2f} / p99 {block.latency_p99_ms:.2f} ms"
    )
    return f"{release}: {block.requests} requests, {block.errors} errors{latency}"


def seen_status(seen: dict[str, dict[str, str]], payload: bytes) -> None:
    """Note a retained status in ``seen`` (agent -> fields shown): its state, prototype,
    when its connection started and, for an agent that serves a model, its inference
    counters.
    An undecodable payload changes nothing."""
    try:
        st = decode_message(Status, payload)
    except WireError:
        return
    info = seen.setdefault(st.agent_id, {})
    info["state"] = st.state
    if st.prototype is not None:
        info["prototype"] = st.prototype
    if st.time > 0:
        info["last_seen"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.time))
    if st.inference is not None:
        info["serving"] = serving_summary(st.inference)


QUIET_S = 0.3  # retained statuses come right after the subscription; this long without one: all


def wait_quiet(
    latest: Callable[[], float | None],
    listen_s: float,
    quiet_s: float = QUIET_S,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Wait until ``quiet_s`` passed since ``latest()`` (the clock time of the last
    message; None while none came), at most ``listen_s`` from now; the seconds waited."""
    start = clock()
    end = start + listen_s
    while (now := clock()) < end:
        last = latest()
        if last is not None and now - last >= quiet_s:
            break
        sleep(min(0.05, end - now))
    return clock() - start


def broker_presence(
    url: str,
    fleet: str,
    listen_s: float,
    *,
    password: str | None = None,
    ca_file: str | None = None,
    quiet_s: float = QUIET_S,
) -> dict[str, dict[str, str]]:
    """Retained statuses of the fleet's agents (state, prototype, last seen), collected
    once subscribed until none came for ``quiet_s`` (the broker sends the retained ones
    at once), at most ``listen_s`` (registrations are not retained: an agent's status
    names its prototype)."""
    topics = Topics(fleet)
    seen: dict[str, dict[str, str]] = {}
    lock = threading.Lock()
    last: list[float | None] = [None]  # when the latest status was handled

    def on_status(topic: str, payload: bytes) -> None:
        with lock:
            seen_status(seen, payload)
            last[0] = time.monotonic()

    # A clean session: a probe must leave nothing behind on the broker. A client id of its
    # own (<login>-<random>): on Mosquitto's service listener, where the read-only monitor
    # logs in, two probes with one login never take each other's session over.
    # QoS 0: a snapshot of retained messages needs no acknowledgement per message, so the
    # broker sends thousands of them at once instead of 20 in flight at a time
    settings = replace(parse_broker_url(url, password=password, ca_file=ca_file), qos=0)
    client_id = unique_client_id(settings.username or "takfl-status")
    client = MqttClient(settings, client_id, persistent=False)
    client.route(topics.up_filter(Up.STATUS), on_status)
    client.start(timeout=10)  # returns once the subscription is answered
    try:
        wait_quiet(lambda: last[0], listen_s, quiet_s)
    finally:
        client.stop()
    return seen


AGENT_COLUMNS = ("agent", "prototype", "state", "last seen", "serving (local endpoint)")
RICH_ROWS = 200  # past this many agents the list is plain text (a rich table of 5,000 rows: s)


def agent_rows(seen: dict[str, dict[str, str]]) -> list[tuple[str, str, str, str, str]]:
    """One row per agent, sorted by id: the cells of :data:`AGENT_COLUMNS`."""
    return [
        (
            aid,
            info.get("prototype", "?"),
            info.get("state", "?"),
            info.get("last_seen", "?"),
            info.get("serving", ""),
        )
        for aid, info in sorted(seen.items())
    ]


def presence_summary(seen: dict[str, dict[str, str]]) -> dict[str, dict[str, int]]:
    """prototype -> {"online": n, "offline": n, "serving": n} over the agents seen."""
    out: dict[str, dict[str, int]] = {}
    for info in seen.values():
        counts = out.setdefault(info.get("prototype", "?"), {"online": 0, "offline": 0})
        state = info.get("state", "?")
        counts[state] = counts.get(state, 0) + 1
        if info.get("serving"):
            counts["serving"] = counts.get("serving", 0) + 1
    return dict(sorted(out.items()))


def plain_table(rows: Sequence[tuple[str, ...]], columns: tuple[str, ...] = AGENT_COLUMNS) -> str:
    """``rows`` under ``columns`` as fixed-width text, one line per row."""
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(columns), line(tuple("-" * w for w in widths)), *map(line, rows)])
