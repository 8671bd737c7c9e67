"""``takfl-agent serve``: install the releases of this device's prototype and serve the
active model on a local endpoint. No training, no registration; torch is never loaded."""

from __future__ import annotations

import logging
import signal
from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console

from takfl.config import ConfigError, load_profile

console = Console()


def serve(
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
    release_root: Path = typer.Option(
        ..., help="The fleet's release root (root.json from provision): trusts the release key."
    ),
    state_dir: Path = typer.Option(
        ..., help="Where installed releases live (A/B slots, trust state); kept across restarts."
    ),
    listen: str = typer.Option(
        None,
        help="HOST:PORT of the HTTP endpoint (default 127.0.0.1:8500). Anything but a "
        "loopback address (e.g. 0.0.0.0:8500) lets the network query the model.",
    ),
    socket_path: Path = typer.Option(
        None, "--socket", help="Serve on this UNIX socket instead of TCP."
    ),
    fleet: str = typer.Option(None, help="Fleet name (default: the digits federation's name)."),
    ca_file: str = typer.Option(None, help="mqtts: CA certificate that signed the broker's."),
    cert_file: str = typer.Option(None, help="mqtts: client certificate (mutual TLS)."),
    key_file: str = typer.Option(None, help="mqtts: key of the client certificate."),
    mqtt_protocol: str = typer.Option(
        "5",
        help="MQTT version: 5 (falls back to 3.1.1 when the broker answers that it lacks "
        "MQTT 5) or 3.1.1.",
    ),
    status_every: float = typer.Option(
        30.0, min=1.0, help="Seconds between status updates carrying inference telemetry."
    ),
) -> None:
    """Install this device's releases and answer predictions for the active one."""
    from edge_agent.deploy.deployment import DeployConfig
    from edge_agent.deploy.service import ServeAgent
    from edge_agent.serving.server import DEFAULT_LISTEN, UnixEndpoint, parse_listen
    from takfl.mqtt.client import UNSUPPORTED_PROTOCOL
    from takfl.mqtt.credentials import mqtt_password
    from takfl.mqtt.probe import connack_reason
    from takfl.mqtt.url import parse_broker_url, read_password
    from takfl.release.keys import ReleaseKeyError, load_root
    from takfl.secret_files import load_secret_file
    from takfl.wire.errors import WireError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if listen is not None and socket_path is not None:
        console.print("[red]give --listen or --socket, not both[/red]")
        raise typer.Exit(2)
    if mqtt_protocol not in ("5", "3.1.1"):
        console.print(f"[red]--mqtt-protocol {mqtt_protocol}: expected 5 or 3.1.1[/red]")
        raise typer.Exit(2)
    try:
        prof = load_profile(profile)
        secret = load_secret_file(secret_file)
        root = load_root(release_root)
        settings = parse_broker_url(broker, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        settings = replace(settings, protocol="5" if mqtt_protocol == "5" else "3.1.1")
        if settings.username is not None:
            settings = replace(settings, password=read_password(password_file))
        else:
            settings = replace(settings, username=agent_id, password=mqtt_password(secret))
        if settings.protocol == "5" and connack_reason(settings, 5.0) == UNSUPPORTED_PROTOCOL:
            settings = replace(settings, protocol="3.1.1")
            console.print("the broker speaks MQTT 3.1.1 only; using 3.1.1")
        endpoint = (
            UnixEndpoint(socket_path)
            if socket_path is not None
            else parse_listen(listen or DEFAULT_LISTEN)
        )
        if fleet is None:
            from takfl.config import load_federation

            fleet = load_federation("digits").name
        config = DeployConfig(
            profile=prof,
            fleet=fleet,
            agent_id=agent_id,
            secret=secret,
            root=root,
            state_dir=state_dir,
        )
        agent = ServeAgent(settings, config, endpoint, status_every_s=status_every)
        agent.start()
    except (ConfigError, WireError, ReleaseKeyError, ValueError, OSError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    console.print(
        f"{agent_id}: serving {prof.prototype} releases on {agent.server.endpoint}",
        markup=False,
        highlight=False,
    )
    signal.signal(signal.SIGTERM, lambda *_: agent.stopped.set())
    try:
        agent.run()
    except KeyboardInterrupt:
        pass
    finally:
        agent.close()
    console.print(f"{agent_id}: stopped")
