"""What the benchmark's records become: medians per agent and a status per N, memory
slopes between N values, and the printed tables."""

from __future__ import annotations

import itertools
import statistics
from typing import Any

from rich.table import Table

GOAL_OVERHEAD_S = 5.0  # a round's overhead at the largest N
GOAL_MEMORY_GROWTH = 0.10  # coordinator peak RSS, from 500 agents to the largest N
GOAL_STATUS_S = 2.0  # takfl-coordinator status --broker


def dropped(rec: dict[str, Any]) -> int:
    """Messages lost on the way: the coordinator's (not queued while stopping, or refused
    by its outbox), the agents' (the same), and the broker's (a session queue full)."""
    c, a = rec.get("transport") or {}, rec.get("agent_counters") or {}
    keys = ("mqtt_dropped", "mqtt_publish_refused")
    return sum(c.get(k, 0) + a.get(k, 0) for k in keys) + rec.get("broker_dropped", 0)


def summarise(rec: dict[str, Any]) -> dict[str, Any]:
    """Medians over the rounds, per agent; memory above setup; messages lost; status
    ok/partial/failed."""
    rounds = rec.get("rounds") or []
    n = rec["agents"]
    rec["dropped"] = dropped(rec)
    if rounds:
        rec["round_s_median"] = statistics.median(r["wall_s"] for r in rounds)
        rec["per_agent_ms"] = rec["round_s_median"] / n * 1000
        rec["cpu_ms_per_agent"] = statistics.median(r["cpu_s"] for r in rounds) / n * 1000
        rec["absorb_ms_per_agent"] = statistics.median(r["absorb_s"] for r in rounds) / n * 1000
    if "rss_peak_mb" in rec:
        rec["rss_growth_mb"] = rec["rss_peak_mb"] - rec["rss_setup_mb"]
    complete = len(rounds) > 0 and all(r["received"] == r["sampled"] == n for r in rounds)
    rec["status"] = "failed" if "error" in rec else "ok" if complete else "partial"
    return rec


def goals(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The fleet-scale goals against what was measured: a round's overhead at the largest
    N (no training in it), peak RSS growth from 500 agents to the largest N, messages
    lost, and the slowest ``status``; each with ``met`` (None: not measured)."""
    done = [r for r in results if "round_s_median" in r]
    if not done:
        return {}
    top = max(done, key=lambda r: r["agents"])
    base = next((r for r in done if r["agents"] == 500), None)
    growth = None
    if base is not None and top is not base:
        growth = top["rss_peak_mb"] / base["rss_peak_mb"] - 1
    statuses = [r["status_s"] for r in results if r.get("status_s") is not None]
    lost = sum(r.get("dropped", 0) for r in results)
    return {
        "overhead_s": {
            "agents": top["agents"],
            "measured": top["round_s_median"],
            "goal": GOAL_OVERHEAD_S,
            "met": top["round_s_median"] < GOAL_OVERHEAD_S,
        },
        "memory_growth": {
            "from": 500,
            "to": top["agents"],
            "measured": growth,
            "goal": GOAL_MEMORY_GROWTH,
            "met": None if growth is None else growth <= GOAL_MEMORY_GROWTH,
        },
        "dropped": {"measured": lost, "goal": 0, "met": lost == 0},
        "status_s": {
            "measured": max(statuses, default=None),
            "goal": GOAL_STATUS_S,
            "met": None if not statuses else max(statuses) < GOAL_STATUS_S,
        },
    }


def slopes(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Memory per extra agent between consecutive N values that both got that far."""
    out = []
    for a, b in itertools.pairwise([r for r in results if "rss_peak_mb" in r]):
        extra = b["agents"] - a["agents"]
        row = {"from": a["agents"], "to": b["agents"]}
        for key, per_agent, scale in (
            ("rss_peak_mb", "rss_mb_per_agent", 1.0),
            ("tracemalloc_registered_mb", "traced_held_kb_per_agent", 1000.0),
            ("tracemalloc_peak_mb", "traced_peak_kb_per_agent", 1000.0),
        ):
            if key in a and key in b:
                row[per_agent] = (b[key] - a[key]) * scale / extra
        row["global_blob_bytes"] = b.get("global_blob_bytes")
        row["update_blob_bytes"] = b.get("update_blob_bytes")
        out.append(row)
    return out


def cell(value: Any, fmt: str) -> str:
    """``value`` formatted with ``fmt``; "-" when it is missing."""
    return "-" if value is None else format(value, fmt)


def results_table(record: dict[str, Any]) -> Table:
    t = Table(
        title="Coordinator vs N agents on one Mosquitto (fedavg, agents answer at once: "
        "a round is all overhead)"
    )
    columns = {
        "agents": ("agents", "d"),
        "workers": ("workers", "d"),
        "registered": ("registered", "d"),
        "register s": ("register_s", ".2f"),
        "restart s": ("reregister_s", ".2f"),
        "round s (median)": ("round_s_median", ".3f"),
        "ms/agent": ("per_agent_ms", ".2f"),
        "CPU ms/agent": ("cpu_ms_per_agent", ".2f"),
        "absorb ms/agent": ("absorb_ms_per_agent", ".2f"),
        "RSS setup MB": ("rss_setup_mb", ".1f"),
        "RSS peak MB": ("rss_peak_mb", ".1f"),
        "lost msgs": ("dropped", "d"),
        "status s": ("status_s", ".2f"),
        "telemetry B/rec": ("telemetry_bytes_per_record", ".0f"),
        "traced MB held/peak": ("", ""),
        "updates": ("", ""),
        "status": ("status", "s"),
    }
    for col in columns:
        t.add_column(col, justify="left" if col in ("updates", "status") else "right")
    for r in record["results"]:
        counts = [f"{x['received']}/{x['sampled']}" for x in r.get("rounds") or []]
        updates = f"{counts[0]} x{len(counts)}" if len(set(counts)) == 1 else ", ".join(counts)
        traced = f"{cell(r.get('tracemalloc_registered_mb'), '.2f')} / "
        traced += cell(r.get("tracemalloc_peak_mb"), ".2f")
        cells = [cell(r.get(key), fmt) for key, fmt in columns.values() if key]
        t.add_row(*cells[:-1], traced, updates or "-", cells[-1])
    return t


def recovery_notes(rec: dict[str, Any]) -> str:
    """Non-zero loss and recovery counters of one N (empty when the rounds ran clean)."""
    coordinator = rec.get("transport") or {}
    agents = rec.get("agent_counters") or {}
    items = [
        ("coordinator inbox dropped", coordinator.get("mqtt_dropped")),
        ("coordinator inbox full (network loop held back)", coordinator.get("mqtt_inbox_waits")),
        ("broker dropped", rec.get("broker_dropped")),
        ("coordinator publishes refused", coordinator.get("mqtt_publish_refused")),
        ("chunk re-requests by the coordinator", coordinator.get("chunk_requests_sent")),
        ("tasks sent again", coordinator.get("task_retries")),
        ("updates refused", sum((coordinator.get("refused") or {}).values())),
        ("agent inboxes dropped", agents.get("mqtt_dropped")),
        ("update headers re-announced", agents.get("header_retries")),
    ]
    return ", ".join(f"{label} {v}" for label, v in items if v)


def slope_table(record: dict[str, Any]) -> Table:
    t = Table(title="Coordinator memory per extra agent, next to the model blobs")
    columns = {
        "between N": ("", ""),
        "RSS peak MB / agent": ("rss_mb_per_agent", ".4f"),
        "traced held KB / agent": ("traced_held_kb_per_agent", ".2f"),
        "traced peak KB / agent": ("traced_peak_kb_per_agent", ".2f"),
        "global blob bytes": ("global_blob_bytes", "d"),
        "update blob bytes": ("update_blob_bytes", ".0f"),
    }
    for col in columns:
        t.add_column(col, justify="right")
    for s in record["memory_slopes"]:
        cells = [cell(s.get(key), fmt) for key, fmt in columns.values() if key]
        t.add_row(f"{s['from']} -> {s['to']}", *cells)
    return t
