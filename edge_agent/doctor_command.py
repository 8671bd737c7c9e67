"""``takfl-agent doctor``: the preflight a user runs on a new board before its first ``run``.

torch and the inference runtime are imported in child processes, so a broken or missing
install is reported rather than crashing the doctor, and the doctor itself starts fast. The
broker checks connect once with the agent's credentials, with MQTT 5 where the broker has
it (a refused publish then comes back with a reason), with a clean session: an agent
already running under this id is disconnected while the doctor runs and reconnects after.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from edge_agent.doctor import (
    Check,
    Status,
    check_clock,
    check_platform,
    check_resources,
    check_runtime,
    check_torch,
    exit_code,
    ok,
)
from edge_agent.watch import refusal_fix
from takfl.config import ConfigError, DeviceProfile, load_profile

if TYPE_CHECKING:
    from takfl.mqtt.client import MqttClient, MqttSettings

EXIT_INPUT = 2
CHILD_TIMEOUT_S = 300  # importing torch under emulation or on a slow SD card takes a while

_TORCH_PROBE = """
import json, time
start = time.perf_counter()
import torch
print(json.dumps({"version": torch.__version__, "cuda": torch.version.cuda,
                  "cuda_available": torch.cuda.is_available(),
                  "threads": torch.get_num_threads(),
                  "import_s": time.perf_counter() - start}))
"""
_RUNTIME_PROBE = """
import json, sys
from export.runtimes import runtime_status
print(json.dumps(runtime_status(sys.argv[1])))
"""


def child_json(script: str, *args: str) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter; its last stdout line as JSON, or ``error``."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, *args],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no answer within {CHILD_TIMEOUT_S} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return {"error": last}
    answer = json.loads(lines[-1])
    return answer if isinstance(answer, dict) else {"answer": answer}


def probe_runtime(profile: DeviceProfile) -> Check:
    runtime = profile.inference.runtime
    if runtime == "torch":
        return ok("runtime torch", "torch runs inference (see the torch line)")
    answer = child_json(_RUNTIME_PROBE, runtime)
    if "error" in answer:
        return check_runtime(runtime, False, answer["error"])
    usable, reason = answer["answer"]
    return check_runtime(runtime, bool(usable), str(reason))


def meminfo_mb() -> tuple[float | None, float | None]:
    """(MemTotal, MemAvailable) in MB from /proc/meminfo; None where absent."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None, None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            values[key] = float(rest.split()[0]) / 1024
    return values.get("MemTotal"), values.get("MemAvailable")


def ntp_synchronised() -> bool | None:
    """systemd's view of time synchronisation; None where it cannot tell."""
    tool = shutil.which("timedatectl")
    if tool is None:
        return None
    try:
        out = subprocess.run(
            [tool, "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"yes": True, "no": False}.get(out)


def reachable(settings: MqttSettings) -> Check:
    """Whether a TCP connection to the broker opens within 5 s."""
    where = f"{settings.host}:{settings.port}"
    try:
        socket.create_connection((settings.host, settings.port), timeout=5).close()
    except OSError as e:
        return Check(
            "broker",
            Status.FAIL,
            f"cannot reach {where}: {e}",
            "check the address and port in --broker, that the broker runs, and the "
            "network or firewall between them",
        )
    return ok("broker", f"{where} reachable")


def connect(
    settings: MqttSettings, agent_id: str | None, routes: dict[str, Callable[[str, bytes], None]]
) -> tuple[MqttClient | None, Check]:
    """A started client with ``routes`` (MQTT 5, or 3.1.1 where the broker lacks 5), and
    the credentials check; no client when the broker refused the login."""
    from takfl.mqtt.client import UNSUPPORTED_PROTOCOL, MqttClient, MqttConnectError

    for protocol in ("5", "3.1.1"):
        client = MqttClient(
            replace(settings, protocol=protocol, reconnect_min_s=30, reconnect_max_s=60),
            agent_id or f"takfl-doctor-{os.getpid()}",
            persistent=False,
        )
        for topic, handler in routes.items():
            client.route(topic, handler)
        try:
            client.start(timeout=10)
        except MqttConnectError as e:
            reason = client.last_connect_error or str(e)
            if reason == UNSUPPORTED_PROTOCOL and protocol == "5":
                continue
            who = agent_id or "an anonymous client (give --id and --secret-file)"
            return None, Check(
                "credentials",
                Status.FAIL,
                f"the broker refused {who}: {reason}",
                refusal_fix(reason, agent_id or "this agent"),
            )
        return client, ok("credentials", f"accepted (MQTT {client.settings.protocol})")
    raise RuntimeError("no MQTT client was made")  # the loop returns on its last protocol


def publish_check(client: MqttClient, fleet: str, agent_id: str, secret: bytes | None) -> Check:
    """Publish the agent's own "offline" status (signed as the agent signs it, so the
    coordinator sees an ordinary status) and say whether the broker let it through."""
    from takfl.wire.messages import Status as StatusMessage
    from takfl.wire.messages import encode_message
    from takfl.wire.signing import sign
    from takfl.wire.topics import Topics, Up

    topic = Topics(fleet).up(agent_id, Up.STATUS)
    offline = StatusMessage(agent_id=agent_id, state="offline", time=time.time())
    if secret is not None:
        offline = sign(offline, secret)
    answer = client.publish_confirmed(topic, encode_message(offline), 10, retain=True)
    if answer is None:
        return Check("publish", Status.FAIL, f"no PUBACK on {topic} in 10 s")
    if answer.is_failure:
        return Check(
            "publish",
            Status.FAIL,
            f"refused on {topic}: {answer}",
            f"the broker's ACL lets {agent_id} write only under its fleet: check "
            f"--fleet {fleet} against the coordinator's fleet, and that "
            f"{agent_id} was provisioned for it",
        )
    if client.settings.protocol == "5":
        return ok("publish", f"allowed on {topic}")
    return Check(
        "publish",
        Status.WARN,
        f"sent on {topic}; the broker speaks MQTT 3.1.1, which does not say "
        "whether it refused a message",
    )


def coordinator_check(state: str | None, fleet: str, wait_s: float) -> Check:
    """The coordinator's last status on the fleet's topic (None: none arrived)."""
    if state == "online":
        return ok("coordinator", f"fleet {fleet} online")
    return Check(
        "coordinator",
        Status.FAIL,
        f"no coordinator of fleet {fleet} online ({state or 'not seen'} within {wait_s:g} s)",
        f"start `takfl-coordinator serve` for fleet {fleet} on this broker, or give "
        "the coordinator's fleet with --fleet (its federation's name or its --fleet)",
    )


def broker_checks(
    settings: MqttSettings,
    fleet: str,
    agent_id: str | None,
    wait_s: float,
    secret: bytes | None = None,
) -> tuple[list[Check], float | None]:
    """Reachable, credentials accepted, own publish allowed, a coordinator online.

    The publish test is the agent's own "offline" status, signed with ``secret`` as the agent
    signs it, so the coordinator sees an ordinary status rather than a forged one.
    Returns the checks and the coordinator's status time (for the clock check)."""
    from takfl.wire.errors import WireError
    from takfl.wire.messages import Status as StatusMessage
    from takfl.wire.messages import decode_message
    from takfl.wire.topics import Topics

    checks = [reachable(settings)]
    if checks[0].status is Status.FAIL:
        return checks, None
    seen: list[StatusMessage] = []
    arrived = threading.Event()

    def on_status(_topic: str, payload: bytes) -> None:
        try:
            seen.append(decode_message(StatusMessage, payload))
        except WireError:
            return
        arrived.set()

    client, credentials = connect(
        settings, agent_id, {Topics(fleet).coordinator_status(): on_status}
    )
    checks.append(credentials)
    if client is None:
        return checks, None
    try:
        if agent_id is not None:
            checks.append(publish_check(client, fleet, agent_id, secret))
        arrived.wait(wait_s)
    finally:
        client.stop()
    status = seen[-1] if seen else None
    checks.append(coordinator_check(status.state if status else None, fleet, wait_s))
    return checks, status.time if status is not None else None


def checks_table(checks: list[Check]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("check", no_wrap=True, style="bold")
    table.add_column("", no_wrap=True)
    table.add_column("found", overflow="fold")
    table.add_column("fix", overflow="fold")
    colour = {Status.OK: "green", Status.WARN: "yellow", Status.FAIL: "bold red"}
    for c in checks:
        table.add_row(c.name, Text(c.status.value, style=colour[c.status]), c.detail, c.fix)
    return table


def agent_settings(
    broker: str, agent_id: str | None, secret_file: Path | None, ca_file: str | None, err: Console
) -> tuple[MqttSettings, bytes | None]:
    """The broker settings with the agent's credentials, and its secret; a bad option or
    secret file is printed to ``err`` and ends the command (exit 2)."""
    from takfl.mqtt.credentials import mqtt_password
    from takfl.mqtt.url import parse_broker_url
    from takfl.secret_files import load_secret_file
    from takfl.wire.errors import WireError

    if (agent_id is None) != (secret_file is None):
        err.print(Text("give --id and --secret-file together", style="red"))
        raise typer.Exit(EXIT_INPUT)
    secret = None
    try:
        settings = parse_broker_url(broker, ca_file=ca_file)
        if secret_file is not None:
            secret = load_secret_file(secret_file)
        if agent_id is not None and secret is not None and settings.username is None:
            settings = replace(settings, username=agent_id, password=mqtt_password(secret))
    except (ValueError, WireError, OSError) as e:
        err.print(Text(f"error: {e}", style="red"))
        raise typer.Exit(EXIT_INPUT) from None
    return settings, secret


def local_checks(prof: DeviceProfile) -> list[Check]:
    """Platform, torch, the profile's runtime and the machine's resources."""
    py = sys.version_info
    checks = check_platform(platform.machine(), platform.system(), (py[0], py[1], py[2]))
    checks.append(check_torch(child_json(_TORCH_PROBE), prof))
    checks.append(probe_runtime(prof))
    total, available = meminfo_mb()
    checks += check_resources(
        prof,
        total_mb=total,
        available_mb=available,
        free_disk_mb=shutil.disk_usage(Path.cwd()).free / 2**20,
        cores=len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count() or 1,
    )
    return checks


def doctor(
    profile: str = typer.Option(..., help="Device profile (bundled name or YAML path)."),
    broker: str = typer.Option(None, help="mqtt://host:port or mqtts://host:port to check."),
    agent_id: str = typer.Option(None, "--id", help="This agent's id, as provisioned."),
    secret_file: Path = typer.Option(None, help="The agent's secret (hex, mode 600)."),
    fleet: str = typer.Option("digits", help="Fleet name (the coordinator's federation name)."),
    ca_file: str = typer.Option(None, help="CA certificate for mqtts."),
    wait: float = typer.Option(5.0, min=0.5, help="Seconds to wait for the coordinator."),
) -> None:
    """Check this device before its first run: platform, torch, runtime, resources, clock,
    broker, credentials, ACL and coordinator. Every problem with its fix; exit 1 on any."""
    console = Console()
    err = Console(stderr=True)
    try:
        prof = load_profile(profile)
    except ConfigError as e:
        err.print(Text(str(e), style="red"))
        raise typer.Exit(EXIT_INPUT) from None
    settings, secret = None, None
    if broker is not None:
        settings, secret = agent_settings(broker, agent_id, secret_file, ca_file, err)
    checks = local_checks(prof)
    coordinator_time = None
    if settings is not None:
        more, coordinator_time = broker_checks(settings, fleet, agent_id, wait, secret)
        checks += more
    checks.append(check_clock(time.time(), coordinator_time, ntp_synchronised()))
    console.print(Text(f"takfl-agent doctor: profile {prof.name}", style="bold"))
    console.print(checks_table(checks))
    code = exit_code(checks)
    failed = sum(c.status is Status.FAIL for c in checks)
    console.print(
        Text(f"{failed} problem(s); fix them before `takfl-agent run`", style="bold red")
        if code
        else Text("ready for `takfl-agent run`", style="bold green")
    )
    raise typer.Exit(code)
