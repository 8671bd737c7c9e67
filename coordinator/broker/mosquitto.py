"""Mosquitto provisioning: configuration directory, password file, ACL, and a runner.

``write_mosquitto_config`` writes into one directory::

    mosquitto.conf   listener on host:port (+ optional TLS listeners on exactly the
                     addresses given; the wildcard address only if named) for agents, the
                     coordinator and site bridges, where the client id is forced to the
                     username (an agent cannot take over another's session); a service
                     listener (loopback by default) for monitors and the release service,
                     whose client ids are their own (``<login>-<random>``, so two monitors
                     with one login coexist); no anonymous access, a password file per kind
                     of listener, one ACL, persistence
    passwords        user:$7$... hashes (PBKDF2-SHA512), by ``mosquitto_passwd`` when installed:
                     every login (and site bridges, added by ``site``); on these listeners
                     a monitor or the release service has its login as client id
    service.passwords  the coordinator, the monitor and the release service: agents cannot
                     log in on the service listener at all
    acl              the coordinator user reads/writes takfl/<fleet>/#; each agent (username =
                     agent id) writes only its own up/ tree and reads only its own down/ tree
                     and the fleet's broadcasts
    data/            the persistence database
    systemd-limits.conf  a systemd drop-in for the mosquitto unit: the open-file limit the
                     fleet needs (``LimitNOFILE``)

Sized with the fleet (:class:`FleetLimits`): each agent listener accepts every
provisioned agent plus a margin (``max_connections``), the service listener a few
monitors and services; a client's session may queue ``QUEUED_PER_AGENT`` messages per
agent (the coordinator's session holds every agent's presence, registration, acks,
update header and chunks while it is busy); the process needs a file descriptor per
connection.

``MosquittoProcess`` runs ``mosquitto -c mosquitto.conf`` (with its open-file limit
raised to what the fleet needs, as far as the hard limit allows) and waits for the port.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from coordinator.broker.acl import fleet_acl, mosquitto_acl_text
from coordinator.broker.errors import BrokerStartError
from coordinator.broker.limits import (
    LIMITS_NAME,
    FleetLimits,
    limits_dropin_text,
    open_files_allowed,
    open_files_setter,
)
from coordinator.broker.net import LOOPBACK, port_accepts, wait_port
from takfl.files import atomic_write_text
from takfl.wire.messages import CHUNK_HEADER_BYTES, MAX_CHUNK_BYTES, MAX_PACKET_BYTES
from takfl.wire.topics import Topics, check_ident

log = logging.getLogger(__name__)

MOSQUITTO = "mosquitto"
MOSQUITTO_PASSWD = "mosquitto_passwd"
CONF_NAME = "mosquitto.conf"
PASSWORDS_NAME = "passwords"
SERVICE_PASSWORDS_NAME = "service.passwords"
ACL_NAME = "acl"
DATA_DIR = "data"
LOG_NAME = "mosquitto.log"
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.x writes
SALT_BYTES = 12
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")


@dataclass(frozen=True, kw_only=True)
class MosquittoTls:
    """TLS listeners next to the plain one, one per address in ``binds``."""

    port: int
    cert_file: str
    key_file: str
    ca_file: str | None = None
    require_certificate: bool = False  # mutual TLS
    binds: tuple[str, ...] = ()  # addresses to listen on; empty: the plain listener's


@dataclass(frozen=True, kw_only=True)
class ServiceListener:
    """The listener of monitors and services: its own password file (no agent logs in
    there) and client ids of the clients' choosing."""

    port: int
    host: str
    passwords: Path


@dataclass(frozen=True, kw_only=True)
class MosquittoFiles:
    """Paths written by :func:`write_mosquitto_config` and where the broker listens."""

    directory: Path
    conf: Path
    passwords: Path
    acl: Path
    data: Path
    log: Path
    host: str
    port: int
    password_method: str  # "mosquitto_passwd" or "python"
    service_port: int | None = None  # monitors and services (None: no such listener)
    open_files: int = 1024  # file descriptors the broker needs (FleetLimits.open_files)


def find_mosquitto(name: str = MOSQUITTO) -> str | None:
    """Path of a Mosquitto binary (PATH first, then the usual sbin folders), or None."""
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN_DIRS:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """Mosquitto 2 password hash: ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-SHA512>``."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _check_credentials(credentials: Mapping[str, str]) -> None:
    for user, password in credentials.items():
        check_ident(user, "MQTT username")
        if not password or any(c in password for c in "\r\n\0"):
            raise ValueError(f"password of {user!r} is empty or holds a line break")


def write_password_file(
    path: Path, credentials: Mapping[str, str], *, use_tool: bool | None = None
) -> str:
    """Write a Mosquitto password file (mode 0600); returns the method used.

    ``use_tool``: True requires ``mosquitto_passwd``, False hashes in Python,
    None uses the tool when installed.
    """
    _check_credentials(credentials)
    tool = find_mosquitto(MOSQUITTO_PASSWD) if use_tool is not False else None
    if use_tool and tool is None:
        raise BrokerStartError(f"{MOSQUITTO_PASSWD} not found; install mosquitto or use_tool=False")
    if tool is None:
        lines = "".join(f"{u}:{hash_password(p)}\n" for u, p in credentials.items())
        atomic_write_text(path, lines, mode=0o600)
        return "python"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    for user, password in credentials.items():
        # -b takes the password on the command line: acceptable for provisioning on the
        # coordinator host; use_tool=False avoids it.
        subprocess.run(
            [tool, "-b", str(path), user, password], check=True, capture_output=True, timeout=30
        )
    return MOSQUITTO_PASSWD


def set_password(path: Path, user: str, password: str) -> None:
    """Replace (or add) ``user``'s line of a Mosquitto password file, hashed in Python
    (mode 0600); the other lines stay as they are. Mosquitto reads it again on SIGHUP."""
    _check_credentials({user: password})
    lines = path.read_text().splitlines() if path.is_file() else []
    kept = [line for line in lines if line.partition(":")[0] != user]
    atomic_write_text(
        path, "".join(f"{x}\n" for x in [*kept, f"{user}:{hash_password(password)}"]), mode=0o600
    )


def acl_text(
    topics: Topics,
    coordinator_user: str,
    agents: Iterable[str],
    monitor_user: str | None = None,
    release_user: str | None = None,
) -> str:
    """ACL file of the fleet (rules in :mod:`coordinator.broker.acl`)."""
    return mosquitto_acl_text(
        fleet_acl(topics, coordinator_user, agents, monitor_user, release_user)
    )


def conf_text(
    *,
    host: str,
    port: int,
    passwords: Path,
    acl: Path,
    data: Path,
    log_file: Path,
    persistence: bool = True,
    autosave_interval_s: int = 60,
    tls: MosquittoTls | None = None,
    run_as: str | None = None,
    max_queued_messages: int = 10_000,
    max_packet_bytes: int | None = MAX_PACKET_BYTES,
    service: ServiceListener | None = None,
    limits: FleetLimits | None = None,
) -> str:
    """``mosquitto.conf`` text (Mosquitto 2.x).

    ``limits``: connections per listener and the session queue of a fleet
    (:class:`FleetLimits`); None: ``max_queued_messages`` as given, connections unlimited.

    Sizes: a PUBLISH whose payload is over ``message_size_limit`` (a full chunk and its
    header) is dropped by the broker; a packet over ``max_packet_size`` closes the
    sender's connection before the broker buffers it. ``max_packet_bytes=None`` writes
    neither (Mosquitto's default: no limit; for measurements only).

    With ``service``, logins are per listener (``per_listener_settings true``): the
    agents' listeners read ``passwords`` and force the client id to the username, the
    service listener reads its own password file and leaves client ids alone.
    """
    per_listener = service is not None
    agent_auth = _auth_lines(passwords, acl) if per_listener else []
    lines = [
        "# takfl: generated Mosquitto configuration",
        f"per_listener_settings {'true' if per_listener else 'false'}",
        *([] if per_listener else _auth_lines(passwords, acl)),
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {data.resolve()}/",
        f"autosave_interval {autosave_interval_s}",
        "persistent_client_expiration 14d",
        # a persistent session may queue a whole blob's chunks while its client is away, and
        # the coordinator's every agent's messages while it is busy
        f"max_queued_messages {limits.max_queued_messages if limits else max_queued_messages}",
        f"log_dest file {log_file.resolve()}",
        "log_type error",
        "log_type warning",
        "log_type notice",
    ]
    if max_packet_bytes is not None:
        lines += [
            f"message_size_limit {MAX_CHUNK_BYTES + CHUNK_HEADER_BYTES}",
            f"max_packet_size {max_packet_bytes}",
        ]
    if run_as is not None:
        lines.append(f"user {run_as}")
    agent_cap = [] if limits is None else [f"max_connections {limits.max_connections}"]
    lines += ["", f"listener {port} {host}", *agent_auth, *agent_cap]
    lines.append("use_username_as_clientid true")
    if tls is not None:
        lines += tls_listener_lines(tls, host, [*agent_auth, *agent_cap])
    if service is not None:
        lines += [
            "",
            f"listener {service.port} {service.host}",
            *_auth_lines(service.passwords, acl),
            *([] if limits is None else [f"max_connections {limits.service_connections}"]),
            "# monitors and services: client ids are their own (<login>-<random>)",
        ]
    return "\n".join(lines) + "\n"


def tls_listener_lines(tls: MosquittoTls, host: str, auth: list[str] | None = None) -> list[str]:
    """``mosquitto.conf`` lines of the TLS listeners: one per address of ``tls.binds``
    (none given: the plain listener's ``host``), never every interface by omission; with
    ``auth``, the listener's own login lines (``per_listener_settings true``)."""
    lines: list[str] = []
    for bind in tls.binds or (host,):
        if not bind or any(c.isspace() for c in bind):
            raise ValueError(f"a listener address must be one word, got {bind!r}")
        lines += [
            "",
            f"listener {tls.port} {bind}",
            *(auth or []),
            "use_username_as_clientid true",
            f"certfile {tls.cert_file}",
            f"keyfile {tls.key_file}",
            f"require_certificate {'true' if tls.require_certificate else 'false'}",
        ]
        if tls.ca_file is not None:
            lines.append(f"cafile {tls.ca_file}")
    return lines


def _auth_lines(passwords: Path, acl: Path) -> list[str]:
    """No anonymous access; logins from ``passwords``, topic rules from ``acl``."""
    return [
        "allow_anonymous false",
        f"password_file {passwords.resolve()}",
        f"acl_file {acl.resolve()}",
    ]


def write_mosquitto_config(
    directory: str | Path,
    *,
    fleet: str,
    port: int,
    coordinator: tuple[str, str],
    agents: Mapping[str, str],
    host: str = LOOPBACK,
    persistence: bool = True,
    autosave_interval_s: int = 60,
    tls: MosquittoTls | None = None,
    run_as: str | None = None,
    use_tool: bool | None = None,
    monitor: tuple[str, str] | None = None,
    max_packet_bytes: int | None = MAX_PACKET_BYTES,
    release: tuple[str, str] | None = None,
    service_port: int | None = None,
) -> MosquittoFiles:
    """Write a complete Mosquitto configuration for one fleet.

    Args:
        coordinator: (username, password) of the coordinator.
        monitor: (username, password) of a read-only observer, e.g. for status probes.
        release: (username, password) of the release service (``takfl-coordinator
            release``): offers and artifact chunks only.
        agents: agent id (its username) -> password.
        run_as: ``user`` option (the account mosquitto drops to when started as root).
        use_tool: see :func:`write_password_file`.
        service_port: the service listener's port (on ``host``): the coordinator, the
            monitor and the release service log in there with client ids of their own
            (several monitors under one login), agents cannot log in there. None: no
            service listener (client ids forced to usernames everywhere).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    topics = Topics(fleet)
    if coordinator[0] in agents:
        raise ValueError(f"coordinator username {coordinator[0]!r} is also an agent id")
    files_conf, passwords, acl = d / CONF_NAME, d / PASSWORDS_NAME, d / ACL_NAME
    data, log_file = d / DATA_DIR, d / LOG_NAME
    data.mkdir(exist_ok=True)
    limits = FleetLimits.for_agents(len(agents))
    atomic_write_text(d / LIMITS_NAME, limits_dropin_text(limits))
    users = {coordinator[0]: coordinator[1], **agents}
    for extra in (monitor, release):
        if extra is not None:
            users[extra[0]] = extra[1]
    services = {u: p for u, p in users.items() if u not in agents}
    method = write_password_file(passwords, users, use_tool=use_tool)
    service = None
    if service_port is not None:
        service_file = d / SERVICE_PASSWORDS_NAME
        service = ServiceListener(port=service_port, host=host, passwords=service_file)
        write_password_file(service.passwords, services, use_tool=use_tool)
    acl.write_text(
        acl_text(
            topics,
            coordinator[0],
            agents,
            monitor[0] if monitor else None,
            release[0] if release else None,
        )
    )
    os.chmod(acl, 0o600)
    files_conf.write_text(
        conf_text(
            host=host,
            port=port,
            passwords=passwords,
            acl=acl,
            data=data,
            log_file=log_file,
            persistence=persistence,
            autosave_interval_s=autosave_interval_s,
            tls=tls,
            run_as=run_as,
            max_packet_bytes=max_packet_bytes,
            service=service,
            limits=limits,
        )
    )
    return MosquittoFiles(
        directory=d,
        conf=files_conf,
        passwords=passwords,
        acl=acl,
        data=data,
        log=log_file,
        host=host,
        port=port,
        password_method=method,
        service_port=service_port,
        open_files=limits.open_files,
    )


class MosquittoProcess:
    """``mosquitto -c <conf>`` as a child process."""

    def __init__(self, files: MosquittoFiles, *, binary: str | None = None) -> None:
        self.files = files
        self.binary = binary
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return self.files.host

    @property
    def port(self) -> int:
        return self.files.port

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _log_tail(self) -> str:
        try:
            return self.files.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        """Start and wait until the port accepts; :class:`BrokerStartError` otherwise."""
        if self.running:
            return self
        binary = self.binary or find_mosquitto()
        if binary is None:
            raise BrokerStartError("mosquitto not found: install it (apt install mosquitto)")
        if port_accepts(self.host, self.port):
            raise BrokerStartError(f"{self.host}:{self.port} is already in use; pick another port")
        stderr_path = self.files.directory / "mosquitto.stderr"
        allowed = open_files_allowed(self.files.open_files)
        if allowed < self.files.open_files:
            log.warning(
                "mosquitto needs %d open files for this fleet; the hard limit allows %d",
                self.files.open_files,
                allowed,
            )
        with open(stderr_path, "wb") as err:
            self._proc = subprocess.Popen(
                [binary, "-c", str(self.files.conf)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                preexec_fn=open_files_setter(allowed),
            )
        ports = [p for p in (self.port, self.files.service_port) if p is not None]
        if not all(wait_port(self.host, p, timeout) for p in ports) or not self.running:
            code = self._proc.poll()
            self.stop()
            raise BrokerStartError(
                f"mosquitto did not listen on {self.host}:{self.port} (exit {code}); log:\n"
                f"{self._log_tail()}{stderr_path.read_text(errors='replace')[-2000:]}"
            )
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its persistence database), then SIGKILL if needed."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("mosquitto did not stop in %.0f s; killing it", timeout)
            proc.kill()
            proc.wait(timeout)

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
