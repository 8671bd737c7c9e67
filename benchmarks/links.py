"""A real federation whose agents sit behind emulated field links, one per tier.

    sudo python benchmarks/links.py [--rounds 4] [--pair UP DOWN ...]
        [--json benchmarks/results/links.json] [--keep DIR]

For each codec pair (``--pair fp16 full --pair sign1:density=0.65,block=512
rot3:block=1024``; DOWN ``full``: the full global model every round) it
provisions the small digits federation of the end-to-end tests (2 S, 2 M, 1 L agents,
everyone sampled every round), starts Mosquitto, ``takfl-coordinator serve`` on this
host and one ``takfl-agent run`` process per agent inside a network namespace of its
tier, and reads bytes, round times and accuracy from the run directory.

Each tier's namespace reaches the host through a veth pair:

- **rate**: a token bucket (``tc qdisc ... tbf``) on both ends of the pair, so upload
  and download each get the tier's rate;
- **loss**: nftables in the namespace drops each packet in and out with the tier's
  probability (``numgen random``), so TCP retransmits as on a lossy radio link;
- **delay**: a relay on the host's end of the pair holds every byte for the tier's
  one-way delay in each direction before passing it on to the broker (user space,
  because this kernel has no ``sch_netem``; ``tc qdisc add ... netem`` fails with
  "Specified qdisc kind is unknown").

Tiers (default): S 50 kbit/s, 300 ms one way, 1 % loss (LTE-M / NB-IoT class); M
1 Mbit/s, 50 ms, 0.1 %; L 100 Mbit/s, 5 ms, no loss. Needs root, iproute2 and
nftables (Debian: ``apt-get install -y iproute2 nftables``) and Mosquitto.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.broker.net import free_port  # noqa: E402
from coordinator.testbed import federation, metrics, read_state  # noqa: E402
from takfl.run_layout import TELEMETRY_FILE  # noqa: E402


@dataclass(frozen=True, kw_only=True)
class Link:
    rate_kbit: int
    delay_ms: float  # one way
    loss: float  # probability per packet, each direction


LINKS = {
    "S": Link(rate_kbit=50, delay_ms=300, loss=0.01),
    "M": Link(rate_kbit=1000, delay_ms=50, loss=0.001),
    "L": Link(rate_kbit=100_000, delay_ms=5, loss=0.0),
}
DEFAULT_PAIRS = [["fp16", "full"], ["sign1:density=0.65,block=512", "rot3:block=1024"]]


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


# -- the namespaces ---------------------------------------------------------------------
@dataclass(frozen=True)
class Tier:
    name: str
    namespace: str
    host_ip: str  # the host's end of the pair (the relay listens here)
    link: Link


def make_tier(index: int, name: str, link: Link) -> Tier:
    ns, host, inner = f"tkfl-{name}", f"tkfl{name}h", f"tkfl{name}n"
    subnet = f"10.77.{index + 1}"
    with contextlib.suppress(subprocess.CalledProcessError):
        sh("ip", "netns", "del", ns)
    with contextlib.suppress(subprocess.CalledProcessError):
        sh("ip", "link", "del", host)
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", host, "type", "veth", "peer", "name", inner)
    sh("ip", "link", "set", inner, "netns", ns)
    sh("ip", "addr", "add", f"{subnet}.1/24", "dev", host)
    sh("ip", "link", "set", host, "up")
    run_ns = ("ip", "netns", "exec", ns)
    sh(*run_ns, "ip", "addr", "add", f"{subnet}.2/24", "dev", inner)
    sh(*run_ns, "ip", "link", "set", inner, "up")
    sh(*run_ns, "ip", "link", "set", "lo", "up")
    rate = f"{link.rate_kbit}kbit"
    burst = str(max(1600, link.rate_kbit * 1000 // 8 // 100))  # 10 ms of the rate
    for run, dev in (((), host), (run_ns, inner)):
        sh(
            *run,
            "tc",
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            burst,
            "latency",
            "2s",
        )
    if link.loss > 0:
        per_million = str(round(link.loss * 1_000_000))
        sh(*run_ns, "nft", "add", "table", "inet", "tkfl")
        for hook in ("input", "output"):
            sh(
                *run_ns,
                "nft",
                "add",
                "chain",
                "inet",
                "tkfl",
                hook,
                f"{{ type filter hook {hook} priority 0; }}",
            )
            sh(
                *run_ns,
                "nft",
                "add",
                "rule",
                "inet",
                "tkfl",
                hook,
                "meta",
                "l4proto",
                "tcp",
                "numgen",
                "random",
                "mod",
                "1000000",
                "<",
                per_million,
                "drop",
            )
    return Tier(name, ns, f"{subnet}.1", link)


def drop_tier(tier: Tier) -> None:
    with contextlib.suppress(subprocess.CalledProcessError):
        sh("ip", "netns", "del", tier.namespace)
    with contextlib.suppress(subprocess.CalledProcessError):
        sh("ip", "link", "del", f"tkfl{tier.name}h")


# -- the delay relay --------------------------------------------------------------------
class DelayRelay:
    """Accepts on ``listen`` and passes every connection on to ``target``, holding each
    read for ``delay_s`` in each direction (order kept)."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay_s: float) -> None:
        self.listen, self.target, self.delay_s = listen, target, delay_s
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def start(self) -> DelayRelay:
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self.loop)
        fut.result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, *self.listen)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        with contextlib.suppress(asyncio.CancelledError):  # the relay is stopping
            await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                dst.write(data)
                with contextlib.suppress(ConnectionError):
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        task = asyncio.create_task(deliver())
        try:
            while data := await src.read(65536):
                queue.put_nowait((time.monotonic() + self.delay_s, data))
        except ConnectionError:
            pass
        queue.put_nowait((time.monotonic() + self.delay_s, b""))
        await task

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextlib.contextmanager
def emulated_links(broker_port: int, links: dict[str, Link]) -> Iterator[dict[str, str]]:
    """Tier -> the broker URL its agents use (through their namespace's link)."""
    tiers = [make_tier(i, name, link) for i, (name, link) in enumerate(links.items())]
    relays = []
    try:
        urls = {}
        for t in tiers:
            port = free_port()
            relays.append(
                DelayRelay(
                    (t.host_ip, port), ("127.0.0.1", broker_port), t.link.delay_ms / 1000
                ).start()
            )
            urls[t.name] = f"mqtt://{t.host_ip}:{port}"
        yield urls
    finally:
        for r in relays:
            r.stop()
        for t in tiers:
            drop_tier(t)


# -- one federation ---------------------------------------------------------------------
def run_pair(up: str, down: str | None, rounds: int, work: Path) -> dict[str, Any]:
    comms = {"compression": up} | ({"downstream": down} if down else {})
    with federation(work, "mosquitto", rounds=rounds, comms=comms) as fed:
        with emulated_links(fed.port, LINKS) as urls:
            for agent_id in ("S-000", "S-001", "M-000", "M-001", "L-000"):
                tier = agent_id.split("-")[0]
                ns = f"tkfl-{tier}"
                fed.start_agent(agent_id, broker=urls[tier], prefix=("ip", "netns", "exec", ns))
            started = time.monotonic()
            coord = fed.start_coordinator("--deadline", "900", "--wait-all", "600")
            code = coord.wait(3600)
            wall = time.monotonic() - started
            if code != 0:
                raise RuntimeError(f"coordinator exited {code}\n{fed.logs()}")
        state = read_state(fed.run_dir)
        assert state.get("phase") == "finished", state
        records = [
            json.loads(line)
            for line in (fed.run_dir / TELEMETRY_FILE).read_text().splitlines()
            if line.strip()
        ]
        round_recs = sorted((r for r in records if r["kind"] == "round"), key=lambda r: r["round"])
        accuracy = metrics(fed.run_dir)
    tiers = ("S", "M", "L")
    clients = {"S": 2, "M": 2, "L": 1}
    per_round = []
    elapsed = 0.0
    for r in round_recs:
        elapsed += r["duration_s"]
        acc = {a["prototype"]: a["test_accuracy"] for a in accuracy if a["round"] == r["round"]}
        per_round.append(
            {
                "round": r["round"],
                "duration_s": r["duration_s"],
                "elapsed_s": elapsed,
                "down_bytes_per_agent": {t: r["bytes_down"][t] / clients[t] for t in tiers},
                "up_bytes_per_agent": {t: r["bytes_up"][t] / clients[t] for t in tiers},
                "accuracy": acc,
            }
        )
    return {"up": up, "down": down or "full", "wall_s": wall, "rounds": per_round}


def time_to(run: dict[str, Any], tier: str, target: float) -> float | None:
    """Seconds of rounds until ``tier`` first reached ``target`` % (None: never)."""
    for r in run["rounds"]:
        if r["accuracy"].get(tier, 0.0) >= target:
            return float(r["elapsed_s"])
    return None


def table(runs: list[dict[str, Any]], target: float) -> str:
    lines = [
        "| up : down | round 1 s | later rounds s (mean) | S down / up bytes per agent, later "
        "rounds | M down / up | L down / up | final S / M / L % | "
        f"s to {target:g} % (S / M / L) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        rs = run["rounds"]
        later = rs[1:] or rs

        def mean(key: str, tier: str, rows: list[dict[str, Any]] = later) -> float:
            return sum(r[key][tier] for r in rows) / len(rows)

        cells = [
            f"{mean('down_bytes_per_agent', t):,.0f} / {mean('up_bytes_per_agent', t):,.0f}"
            for t in ("S", "M", "L")
        ]
        final = rs[-1]["accuracy"]
        tta = [time_to(run, t, target) for t in ("S", "M", "L")]
        lines.append(
            f"| {run['up']} : {run['down']} | {rs[0]['duration_s']:.1f} | "
            f"{sum(r['duration_s'] for r in later) / len(later):.1f} | {' | '.join(cells)} | "
            + " / ".join(f"{final.get(t, 0):.1f}" for t in ("S", "M", "L"))
            + " | "
            + " / ".join("—" if x is None else f"{x:.0f}" for x in tta)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument(
        "--pair",
        nargs=2,
        action="append",
        metavar=("UP", "DOWN"),
        help="an update codec and a downstream codec (or full); repeatable",
    )
    ap.add_argument("--target", type=float, default=80.0, help="accuracy for time-to-accuracy")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    import tempfile

    pairs = [(up, None if down == "full" else down) for up, down in args.pair or DEFAULT_PAIRS]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        for i, (up, down) in enumerate(pairs):
            print(
                f"[{i + 1}/{len(pairs)}] {up} up, {down or 'full'} down, {args.rounds} rounds",
                flush=True,
            )
            work = base / f"pair-{i}"
            work.mkdir(parents=True, exist_ok=True)
            runs.append(run_pair(up, down, args.rounds, work))
    print(table(runs, args.target))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        links = {n: vars(link) for n, link in LINKS.items()}
        out = {"links": links, "rounds": args.rounds, "target": args.target, "runs": runs}
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
