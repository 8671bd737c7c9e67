"""benchmarks/links.py: the delay relay keeps every byte and its order and holds it for
its delay; a tier's namespace reaches the host only through its shaped pair, and is
gone after. (The full federation behind the links is the benchmark itself.)"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "links.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("links_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["links_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def echo_server() -> int:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        conn, _ = srv.accept()
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return int(srv.getsockname()[1])


def test_the_relay_passes_every_byte_in_order_after_its_delay() -> None:
    links = load()
    port = echo_server()
    relay = links.DelayRelay(("127.0.0.1", 0), ("127.0.0.1", port), 0.2)
    relay.listen = ("127.0.0.1", _free())
    relay.start()
    try:
        with socket.create_connection(relay.listen) as s:
            payload = bytes(range(256)) * 800  # 200 KiB
            started = time.monotonic()
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                got += s.recv(65536)
            elapsed = time.monotonic() - started
        assert got == payload
        assert elapsed >= 0.4  # held 0.2 s each way
    finally:
        relay.stop()


def _free() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


needs_root_tools = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "tc", "nft")),
    reason="needs root, iproute2 and nftables (.ci/install installs them)",
)


@needs_root_tools
def test_a_tier_namespace_is_shaped_lossy_and_removed() -> None:
    links = load()
    link = links.Link(rate_kbit=200, delay_ms=0, loss=0.01)
    tier = links.make_tier(5, "T", link)
    try:
        run_ns = ["ip", "netns", "exec", tier.namespace]
        qdisc = subprocess.run([*run_ns, "tc", "qdisc", "show"], capture_output=True, text=True)
        assert "tbf" in qdisc.stdout and "200Kbit" in qdisc.stdout
        rules = subprocess.run([*run_ns, "nft", "list", "ruleset"], capture_output=True, text=True)
        assert "numgen random mod 1000000" in rules.stdout and "drop" in rules.stdout
        ping = subprocess.run(
            [*run_ns, "ip", "route", "get", tier.host_ip], capture_output=True, text=True
        )
        assert ping.returncode == 0 and "tkflTn" in ping.stdout
    finally:
        links.drop_tier(tier)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert tier.namespace not in listed
