"""``takfl-agent run``: join a federation and serve its tasks."""

from __future__ import annotations

import logging
import signal
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from takfl.config import ConfigError, load_profile

if TYPE_CHECKING:
    from edge_agent.runner import ReleaseOptions

console = Console()


def run(
    profile: str = typer.Option(..., help="Bundled device profile name or YAML path."),
    broker: str = typer.Option(
        ...,
        help="mqtt://host:port or mqtts://host:port (USER@ optional, with --password-file; "
        "by default the agent id and a password derived from the secret).",
    ),
    password_file: Path = typer.Option(
        None, help="Broker password for a USER@ in --broker; else $TAKFL_BROKER_PASSWORD."
    ),
    agent_id: str = typer.Option(..., "--id", help="This agent's id, as provisioned."),
    secret_file: Path = typer.Option(..., help="The agent's secret (hex, mode 600)."),
    data: Path = typer.Option(None, help="Private data: a .npz file (x, y) or image folder."),
    demo_shard: int = typer.Option(None, help="Use shard K of a bundled demo federation."),
    federation: str = typer.Option("digits", help="Federation of --demo-shard."),
    fleet: str = typer.Option(None, help="Fleet name (default: --federation's name)."),
    threads: int = typer.Option(None, min=1, help="Override the profile's training threads."),
    ca_file: str = typer.Option(None, help="mqtts: CA certificate that signed the broker's."),
    cert_file: str = typer.Option(None, help="mqtts: client certificate (mutual TLS)."),
    key_file: str = typer.Option(None, help="mqtts: key of the client certificate."),
    max_tasks: int = typer.Option(None, min=1, help="Exit after this many tasks."),
    mqtt_protocol: str = typer.Option(
        "5",
        help="MQTT version: 5 (a refused connection or message comes with a reason; falls "
        "back to 3.1.1 on a broker without MQTT 5) or 3.1.1.",
    ),
    patience: float = typer.Option(
        60.0, min=1.0, help="Seconds without broker or coordinator before saying so."
    ),
    release_root: Path = typer.Option(
        None,
        help="Also install the fleet's model releases: its root.json (from provision), "
        "which names the release key. Needs --state-dir.",
    ),
    state_dir: Path = typer.Option(
        None,
        help="The agent's own state: its codec state (the error-feedback residual and the "
        "last global models, kept across restarts) and installed releases (A/B slots, "
        "trust state). Without it, codec state is kept in memory only.",
    ),
    serve_on: str = typer.Option(
        None,
        "--serve",
        help="Serve the active release for inference on HOST:PORT (e.g. 127.0.0.1:8500; "
        "loopback unless said otherwise). Needs --release-root.",
    ),
) -> None:
    """Train on local data for the coordinator, within the device profile's limits."""
    from edge_agent.data import load_demo_shard, load_local_data
    from edge_agent.runner import Agent, RegistrationRefused
    from takfl.data import DataError
    from takfl.mqtt.credentials import mqtt_password
    from takfl.mqtt.url import parse_broker_url, read_password
    from takfl.ondevice import ExecuTorchMissing
    from takfl.secret_files import load_secret_file
    from takfl.wire.errors import WireError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        prof = load_profile(profile)
    except ConfigError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    if threads is not None:
        prof.training.threads = threads
    if (data is None) == (demo_shard is None):
        console.print("[red]give exactly one of --data DIR and --demo-shard K[/red]")
        raise typer.Exit(2)
    if (release_root is not None and state_dir is None) or (serve_on and release_root is None):
        console.print("[red]--release-root needs --state-dir; --serve needs both[/red]")
        raise typer.Exit(2)
    if mqtt_protocol not in ("5", "3.1.1"):
        console.print(f"[red]--mqtt-protocol {mqtt_protocol}: expected 5 or 3.1.1[/red]")
        raise typer.Exit(2)
    try:
        secret = load_secret_file(secret_file)
        settings = parse_broker_url(broker, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        settings = replace(settings, protocol="5" if mqtt_protocol == "5" else "3.1.1")
        if settings.username is not None:
            settings = replace(settings, password=read_password(password_file))
        else:
            settings = replace(settings, username=agent_id, password=mqtt_password(secret))
        if demo_shard is not None:
            _, x, y = load_demo_shard(federation, prof.prototype, demo_shard)
        else:
            x, y = load_local_data(data)
        releases = release_options(release_root, state_dir, serve_on)
    except (WireError, DataError, ValueError, ConfigError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if fleet is None:
        from takfl.config import load_federation

        fleet = load_federation(federation).name
    try:
        agent = Agent(
            prof,
            settings,
            fleet,
            agent_id,
            secret,
            x,
            y,
            report=lambda m: console.print(m, markup=False, highlight=False),
            patience_s=patience,
            releases=releases,
            codec_dir=None if state_dir is None else state_dir / "codec",
        )
    except ExecuTorchMissing as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    signal.signal(signal.SIGTERM, lambda *_: agent.stop_event.set())
    try:
        stats = agent.run(max_tasks=max_tasks)
    except KeyboardInterrupt:
        stats = agent.stats
    except RegistrationRefused as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(3) from None
    console.print(f"stopped after {stats.tasks_done} task(s)")


def release_options(
    root: Path | None, state_dir: Path | None, serve_on: str | None
) -> ReleaseOptions | None:
    """The release side of ``run``, or None when it installs no releases.

    Raises:
        ValueError: an unreadable root (``ReleaseKeyError``) or a malformed ``--serve``.
    """
    if root is None or state_dir is None:
        return None
    from edge_agent.runner import ReleaseOptions
    from edge_agent.serving.server import parse_listen
    from takfl.release.keys import load_root

    endpoint = parse_listen(serve_on) if serve_on else None
    return ReleaseOptions(root=load_root(root), state_dir=state_dir, endpoint=endpoint)
