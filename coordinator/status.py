"""What ``takfl-coordinator status`` shows: the run's state and agents' presence."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from coordinator.store import RunStore
from takfl.mqtt.client import MqttClient, unique_client_id
from takfl.mqtt.url import parse_broker_url
from takfl.wire.errors import WireError
from takfl.wire.messages import InferenceStatus, Status, decode_message
from takfl.wire.topics import Topics, Up


def run_status(run_dir: Path) -> tuple[dict[str, Any], str]:
    """A flat view of state.json plus the fleet (config) name."""
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


def broker_presence(
    url: str,
    fleet: str,
    listen_s: float,
    *,
    password: str | None = None,
    ca_file: str | None = None,
) -> dict[str, dict[str, str]]:
    """Retained statuses of the fleet's agents (state, prototype, last seen), collected for
    ``listen_s`` (registrations are not retained: an agent's status names its prototype)."""
    topics = Topics(fleet)
    seen: dict[str, dict[str, str]] = {}
    lock = threading.Lock()

    def on_status(topic: str, payload: bytes) -> None:
        with lock:
            seen_status(seen, payload)

    # A clean session: a probe must leave nothing behind on the broker. A client id of its
    # own (<login>-<random>): on Mosquitto's service listener, where the read-only monitor
    # logs in, two probes with one login never take each other's session over.
    settings = parse_broker_url(url, password=password, ca_file=ca_file)
    client_id = unique_client_id(settings.username or "takfl-status")
    client = MqttClient(settings, client_id, persistent=False)
    client.route(topics.up_filter(Up.STATUS), on_status)
    client.start(timeout=10)
    try:
        time.sleep(listen_s)
    finally:
        client.stop()
    return seen
