"""Who may connect and which topics each user may read and write: one definition for
the generated Mosquitto files and the embedded broker.

The coordinator reads and writes everything under its fleet; each agent (username =
agent id) writes only its own ``up/`` tree and reads only its own ``down/`` tree and the
fleet's broadcasts; an optional monitor (``takfl-coordinator status``) only reads; an
optional release service (``takfl-coordinator release``) only sends offers and artifact
chunks down and reads release reports and chunk requests (:func:`release_grants`).
Everything else is denied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from takfl.wire.topics import Direction, Down, Topics, Up, check_ident

Access = Literal["read", "write", "readwrite"]


@dataclass(frozen=True)
class Grant:
    access: Access
    pattern: str  # a topic filter; '+' and '#' as in MQTT


@dataclass(frozen=True)
class FleetAcl:
    """Grants by username, in the order a Mosquitto ACL file lists them."""

    fleet: str
    grants: Mapping[str, tuple[Grant, ...]] = field(default_factory=dict)
    agents: frozenset[str] = frozenset()  # users whose client id must equal the username

    def allows(self, user: str | None, topic: str, action: Literal["read", "write"]) -> bool:
        """True if ``user`` may ``action`` on ``topic`` (a topic, or a subscription filter,
        which must lie wholly inside a granted pattern)."""
        if user is None:
            return False
        return any(
            action in g.access and filter_within(topic, g.pattern)
            for g in self.grants.get(user, ())
        )


def filter_within(requested: str, allowed: str) -> bool:
    """True if every topic ``requested`` can match is also matched by ``allowed``."""
    req, alw = requested.split("/"), allowed.split("/")
    for i, a in enumerate(alw):
        if a == "#":
            return True
        if i >= len(req):
            return False
        r = req[i]
        if a == "+":
            if r == "#":
                return False
            continue
        if r != a:
            return False
    return len(req) == len(alw)


def _every_agent(topics: Topics, direction: Direction, leaf: Up | Down) -> str:
    """``takfl/<fleet>/agent/+/<direction>/<leaf>``."""
    return topics.acl_tree("+", direction).removesuffix("#") + leaf.value


def release_grants(topics: Topics) -> tuple[Grant, ...]:
    """The release service's topics (``coordinator.deploy.service``): offers and artifact
    chunks to every agent, release reports and chunk requests from every agent."""
    return (
        Grant("write", _every_agent(topics, "down", Down.RELEASE)),
        Grant("write", _every_agent(topics, "down", Down.CHUNK)),
        Grant("read", topics.up_filter(Up.RELEASE)),
        Grant("read", topics.up_filter(Up.REQUEST)),
    )


def fleet_acl(
    topics: Topics,
    coordinator_user: str,
    agents: Iterable[str],
    monitor_user: str | None = None,
    release_user: str | None = None,
) -> FleetAcl:
    """The ACL of one fleet (see the module docstring)."""
    grants: dict[str, tuple[Grant, ...]] = {
        check_ident(coordinator_user, "coordinator username"): (
            Grant("readwrite", topics.fleet_filter()),
        )
    }
    if monitor_user is not None:
        grants[check_ident(monitor_user, "monitor username")] = (
            Grant("read", topics.fleet_filter()),
        )
    if release_user is not None:
        grants[check_ident(release_user, "release username")] = release_grants(topics)
    ids = []
    for agent in agents:
        ids.append(check_ident(agent, "agent id"))
        grants[agent] = (
            Grant("write", topics.acl_tree(agent, "up")),
            Grant("read", topics.acl_tree(agent, "down")),
            Grant("read", topics.broadcast_filter()),
        )
    return FleetAcl(topics.fleet, grants, frozenset(ids))


def mosquitto_acl_text(acl: FleetAcl) -> str:
    """The ACL as a Mosquitto ``acl_file``."""
    lines = [f"# takfl fleet {acl.fleet}: generated; agents connect with username = agent id"]
    for user, grants in acl.grants.items():
        if len(lines) > 1:
            lines.append("")
        lines.append(f"user {user}")
        lines += [f"topic {g.access} {g.pattern}" for g in grants]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class BrokerAccess:
    """Credentials and topic rules a broker enforces."""

    passwords: Mapping[str, str] = field(repr=False)  # username -> password
    acl: FleetAcl

    @classmethod
    def for_fleet(
        cls,
        fleet: str,
        coordinator: tuple[str, str],
        agents: Mapping[str, str],
        monitor: tuple[str, str] | None = None,
        release: tuple[str, str] | None = None,
    ) -> BrokerAccess:
        """Coordinator, agents (id -> password), an optional read-only monitor and an
        optional release service."""
        if coordinator[0] in agents:
            raise ValueError(f"coordinator username {coordinator[0]!r} is also an agent id")
        users = {coordinator[0]: coordinator[1], **agents}
        for extra in (monitor, release):
            if extra is not None:
                if extra[0] in agents:
                    raise ValueError(f"username {extra[0]!r} is also an agent id")
                users[extra[0]] = extra[1]
        acl = fleet_acl(
            Topics(fleet),
            coordinator[0],
            agents,
            monitor[0] if monitor else None,
            release[0] if release else None,
        )
        return cls(users, acl)
