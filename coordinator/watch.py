"""``takfl-coordinator status --watch``: a live table of a running federation.

Read from the run directory only (``state.json``, ``pending/``, ``telemetry.jsonl``), so
it needs no broker account and can run beside the coordinator on the workstation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.observe import LATE_REASONS
from coordinator.store import RunStore, RunStoreError


@dataclass(kw_only=True)
class AgentRow:
    agent_id: str
    prototype: str
    online: bool | None = None  # None: no presence seen yet
    registered: bool = False
    last_round: int | None = None  # last round with an accepted update
    this_round: str = ""  # sampled | answered | late | refused:<reason> | "" (not sampled)
    train_s: float | None = None
    peak_rss_mb: float | None = None


@dataclass(kw_only=True)
class WatchView:
    round: int  # last completed round
    phase: str
    open_round: int | None
    agents: list[AgentRow] = field(default_factory=list)

    @property
    def stragglers(self) -> list[str]:
        """Agents sampled in the open round that have not answered (yet)."""
        return [a.agent_id for a in self.agents if a.this_round in ("sampled", "late")]


def watch_view(run_dir: Path) -> WatchView:
    """What the live table shows, read from the run directory now."""
    store = RunStore(run_dir)
    state = store.read_state()
    opened = state.get("open_round")
    open_round = opened["id"] if opened else None
    plan = opened["plan"] if opened else {}
    rows: dict[str, AgentRow] = {}

    def row(agent: str, proto: str | None) -> AgentRow:
        return rows.setdefault(agent, AgentRow(agent_id=agent, prototype=proto or "?"))

    for e in store.telemetry():
        agent = e.get("agent_id")
        if agent is None:
            continue
        r = row(agent, e.get("prototype"))
        kind = e.get("kind")
        if kind == "register":
            r.registered = True
        elif kind == "presence":
            r.online = bool(e.get("online"))
        elif kind == "update":
            r.last_round = e.get("round")
            t: dict[str, Any] = e.get("telemetry") or {}
            r.train_s, r.peak_rss_mb = t.get("train_s"), t.get("peak_rss_mb")
            if e.get("round") == open_round:
                r.this_round = "answered"
        elif kind == "refusal" and e.get("round") == open_round and r.this_round != "answered":
            reason = str(e.get("reason"))
            r.this_round = "late" if reason in LATE_REASONS else f"refused:{reason}"
    answered = set()
    if open_round is not None:
        answered = {p.stem for p in store.pending_dir(int(open_round)).glob("*.safetensors")}
    for proto, ids in plan.items():
        for agent in ids:
            r = row(agent, proto)
            if agent in answered:
                r.this_round = "answered"
            elif not r.this_round:
                r.this_round = "sampled"
    return WatchView(
        round=state["round"],
        phase=str(state.get("phase", "?")),
        open_round=open_round,
        agents=sorted(rows.values(), key=lambda a: (a.prototype, a.agent_id)),
    )


def render_view(view: WatchView, run_dir: Path) -> Any:
    """A rich Table of the view."""
    from rich.table import Table

    open_txt = f", round {view.open_round} open" if view.open_round is not None else ""
    stragglers = ", ".join(view.stragglers) or "none"
    table = Table(
        title=f"{run_dir}: round {view.round} done{open_txt}, phase {view.phase}",
        caption=f"stragglers: {stragglers}  ({time.strftime('%H:%M:%S')})",
    )
    for col in ("agent", "tier", "online", "this round", "last update", "train s", "peak MB"):
        table.add_column(col, justify="left" if col in ("agent", "this round") else "right")
    for a in view.agents:
        online = "?" if a.online is None else ("yes" if a.online else "[red]no[/red]")
        state = a.this_round or "-"
        if state != "answered" and state != "-":
            state = f"[yellow]{state}[/yellow]"
        table.add_row(
            a.agent_id,
            a.prototype,
            online,
            state,
            "-" if a.last_round is None else str(a.last_round),
            "-" if a.train_s is None else f"{a.train_s:.1f}",
            "-" if a.peak_rss_mb is None else f"{a.peak_rss_mb:.0f}",
        )
    return table


def watch_run(run_dir: Path, interval: float, times: int | None, console: Any) -> None:
    """Refresh the live table on ``console`` until Ctrl-C (or ``times`` refreshes)."""
    from rich.live import Live

    def table() -> Any:
        try:
            return render_view(watch_view(run_dir), run_dir)
        except (RunStoreError, OSError, ValueError) as e:
            return f"waiting for {run_dir}: {e}"

    done = 0
    try:
        with Live(table(), console=console, auto_refresh=False) as live:
            while times is None or done < times:
                live.update(table(), refresh=True)
                done += 1
                if times is not None and done >= times:
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
