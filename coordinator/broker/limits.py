"""What a Mosquitto broker serving a fleet of N agents is configured for.

Each agent holds one connection; the coordinator's persistent session receives every
agent's presence, registration, acks and updates, and while the coordinator is busy
the broker queues them for it (``max_queued_messages``: past it Mosquitto drops
messages for that client). So the agent listeners accept every provisioned agent plus
a margin, the service listener a few monitors and services, a session may queue
``QUEUED_PER_AGENT`` messages per agent, and the broker process needs a file
descriptor per connection: ``mosquitto.conf`` carries the first three, the open-file
limit goes to the process (:class:`~coordinator.broker.mosquitto.MosquittoProcess`
raises it for the broker it starts; a systemd unit gets the generated drop-in).
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass

LIMITS_NAME = "systemd-limits.conf"
QUEUED_PER_AGENT = 64  # presence, registration, acks, requests, an update's header and chunks
MIN_QUEUED = 10_000
CONNECTION_MARGIN = 64  # re-connections in flight and site bridges beyond the agents
SERVICE_CONNECTIONS = 64  # the coordinator, monitors and the release service
RESERVED_FILES = 256  # listeners, persistence, log, password and ACL files


@dataclass(frozen=True, kw_only=True)
class FleetLimits:
    """What a broker serving ``agents`` agents is configured for."""

    max_connections: int  # per agent listener
    service_connections: int  # on the service listener
    max_queued_messages: int  # per client session
    open_files: int  # file descriptors the process needs

    @classmethod
    def for_agents(cls, agents: int) -> FleetLimits:
        """Limits for a fleet of ``agents`` agents (0 or more)."""
        if agents < 0:
            raise ValueError(f"a fleet has 0 or more agents, got {agents}")
        connections = agents + CONNECTION_MARGIN
        return cls(
            max_connections=connections,
            service_connections=SERVICE_CONNECTIONS,
            max_queued_messages=max(MIN_QUEUED, QUEUED_PER_AGENT * agents),
            open_files=connections + SERVICE_CONNECTIONS + RESERVED_FILES,
        )


def limits_dropin_text(limits: FleetLimits) -> str:
    """A systemd drop-in for the mosquitto unit that gives it the fleet's open files."""
    return (
        "# takfl: generated; install with `systemctl edit mosquitto` or copy to\n"
        "# /etc/systemd/system/mosquitto.service.d/takfl-limits.conf, then\n"
        "# `systemctl daemon-reload && systemctl restart mosquitto`\n"
        "[Service]\n"
        f"LimitNOFILE={limits.open_files}\n"
    )


def open_files_allowed(needed: int) -> int:
    """The soft open-file limit a child should get: ``needed``, at most the hard limit,
    never below the current soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    return max(soft, target)


def open_files_setter(limit: int) -> Callable[[], None]:
    """Set the soft open-file limit (in the child, before it runs the broker)."""

    def apply() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

    return apply
