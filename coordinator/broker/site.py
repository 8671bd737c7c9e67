"""Site brokers: one Mosquitto per location, bridged to the central broker.

Agents at a site connect to their site broker with their own credentials and ACL
(the same rules as on the central broker); the site broker keeps one bridge
connection to the central broker, so the workstation sees one client per site::

    agents ──► site broker "lab-a" ══ bridge (user site-lab-a) ══► central broker ◄── coordinator
    agents ──► site broker "lab-b" ══ bridge (user site-lab-b) ══►

The bridge carries only the fleet's topics of the site's agents: their ``up/`` trees
out, their ``down/`` trees and the fleet's broadcasts in (``topic <pattern> out|in 1
takfl/<fleet>/ takfl/<fleet>/``: the pattern is relative to the fleet's prefix, and the
prefix is the same on both sides). On the central broker the bridge's user may write
only those ``up/`` trees and read only those ``down/`` trees and the broadcasts.

Nothing is lost across a restart of either broker: QoS 1 everywhere, a persistent
bridge session on both ends (``cleansession false``, ``local_cleansession false``),
persistence on both brokers, and the agents' own persistent sessions on the site broker.

Written by ``write_site_config`` into ``<dir>/sites/<site>/``: ``mosquitto.conf`` (mode
0600: it holds the bridge's password), ``passwords``, ``acl``, ``data/``.
"""

from __future__ import annotations

import fnmatch
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from coordinator.broker.mosquitto import (
    ACL_NAME,
    CONF_NAME,
    DATA_DIR,
    LOG_NAME,
    PASSWORDS_NAME,
    MosquittoFiles,
    acl_text,
    conf_text,
    hash_password,
    write_password_file,
)
from coordinator.broker.net import LOOPBACK
from takfl.files import atomic_write_text
from takfl.wire.topics import BROADCAST, Topics, check_ident

SITES_DIR = "sites"
BRIDGE_USER_PREFIX = "site-"
BRIDGE_QOS = 1


class SiteError(ValueError):
    """A site specification that cannot be provisioned."""


@dataclass(frozen=True)
class SiteSpec:
    """A site: its name and which agents sit behind it (glob patterns of agent ids)."""

    name: str
    patterns: tuple[str, ...] = ("*",)

    @classmethod
    def parse(cls, text: str) -> SiteSpec:
        """``NAME`` (every agent) or ``NAME:PATTERN[,PATTERN...]`` (e.g. ``lab:S-*,M-000``)."""
        name, _, rest = text.partition(":")
        try:
            check_ident(name, "site name")
        except ValueError as e:
            raise SiteError(str(e)) from None
        patterns = tuple(p.strip() for p in rest.split(",") if p.strip()) if rest else ("*",)
        return cls(name, patterns)

    @property
    def bridge_user(self) -> str:
        return f"{BRIDGE_USER_PREFIX}{self.name}"

    def agents(self, all_agents: Sequence[str]) -> list[str]:
        return [a for a in all_agents if any(fnmatch.fnmatchcase(a, p) for p in self.patterns)]


@dataclass(frozen=True, kw_only=True)
class SiteFiles:
    site: str
    broker: MosquittoFiles
    bridge_user: str
    agents: tuple[str, ...]


def bridge_acl(topics: Topics, user: str, agents: Sequence[str]) -> str:
    """Central-broker ACL stanza of a site's bridge user."""
    lines = ["", f"# bridge of site {user[len(BRIDGE_USER_PREFIX) :]}", f"user {user}"]
    for a in agents:
        lines += [
            f"topic write {topics.acl_tree(a, 'up')}",
            f"topic read {topics.acl_tree(a, 'down')}",
        ]
    lines.append(f"topic read {topics.broadcast_filter()}")
    return "\n".join(lines) + "\n"


def bridge_text(
    topics: Topics,
    *,
    site: str,
    user: str,
    password: str,
    central_host: str,
    central_port: int,
    agents: Sequence[str],
) -> str:
    """The ``connection`` section of the site broker's configuration."""
    prefix = f"{topics.root}/"
    lines = [
        "",
        f"connection takfl-{site}",
        f"address {central_host}:{central_port}",
        f"remote_username {user}",
        f"remote_password {password}",
        f"remote_clientid {user}",
        f"local_username {user}",  # the site ACL's readwrite user of the fleet's topics
        "bridge_protocol_version mqttv311",
        "try_private true",
        "cleansession false",
        "local_cleansession false",
        "notifications false",
        "start_type automatic",
        "restart_timeout 1 30",
        "keepalive_interval 30",
    ]
    for a in agents:
        base = topics.acl_tree(a, "up").removeprefix(prefix)
        lines.append(f"topic {base} out {BRIDGE_QOS} {prefix} {prefix}")
        base = topics.acl_tree(a, "down").removeprefix(prefix)
        lines.append(f"topic {base} in {BRIDGE_QOS} {prefix} {prefix}")
    lines.append(f"topic {BROADCAST}/# in {BRIDGE_QOS} {prefix} {prefix}")
    return "\n".join(lines) + "\n"


def write_site_config(
    out_dir: Path,
    site: SiteSpec,
    *,
    fleet: str,
    central: MosquittoFiles,
    central_host: str,
    agent_passwords: Mapping[str, str],
    port: int,
    host: str = LOOPBACK,
    run_as: str | None = None,
) -> SiteFiles:
    """A site broker's configuration, and its bridge user added to the central broker's
    password file and ACL (written by ``write_mosquitto_config`` before)."""
    topics = Topics(fleet)
    agents = site.agents(sorted(agent_passwords))
    if not agents:
        raise SiteError(f"site {site.name!r}: no agent matches {', '.join(site.patterns)}")
    d = out_dir / SITES_DIR / site.name
    data = d / DATA_DIR
    data.mkdir(parents=True, exist_ok=True)
    bridge_password = secrets.token_hex(16)
    # the central broker learns the bridge's user
    with central.passwords.open("a") as f:
        f.write(f"{site.bridge_user}:{hash_password(bridge_password)}\n")
    with central.acl.open("a") as f:
        f.write(bridge_acl(topics, site.bridge_user, agents))
    # the site broker: the site's agents, with the central broker's rules
    passwords, acl = d / PASSWORDS_NAME, d / ACL_NAME
    write_password_file(passwords, {a: agent_passwords[a] for a in agents}, use_tool=False)
    # No one holds a password for the ACL's coordinator user here; it is only named.
    atomic_write_text(acl, acl_text(topics, site.bridge_user, agents), mode=0o600)
    conf = conf_text(
        host=host,
        port=port,
        passwords=passwords,
        acl=acl,
        data=data,
        log_file=d / LOG_NAME,
        autosave_interval_s=5,
        run_as=run_as,
    ) + bridge_text(
        topics,
        site=site.name,
        user=site.bridge_user,
        password=bridge_password,
        central_host=central_host,
        central_port=central.port,
        agents=agents,
    )
    conf_path = d / CONF_NAME
    atomic_write_text(conf_path, conf, mode=0o600)
    os.chmod(passwords, 0o600)
    files = MosquittoFiles(
        directory=d,
        conf=conf_path,
        passwords=passwords,
        acl=acl,
        data=data,
        log=d / LOG_NAME,
        host=host,
        port=port,
        password_method="python",
    )
    return SiteFiles(
        site=site.name, broker=files, bridge_user=site.bridge_user, agents=tuple(agents)
    )
