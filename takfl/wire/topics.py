"""Every MQTT topic of a fleet, defined once.

Layout (``<a>`` is an agent id, ``<p>`` a prototype name)::

    takfl/<fleet>/agent/<a>/up/register     agent -> coordinator  Registration (retained)
    takfl/<fleet>/agent/<a>/up/status       agent -> all          Status (retained; also last will)
    takfl/<fleet>/agent/<a>/up/update       agent -> coordinator  UpdateHeader
    takfl/<fleet>/agent/<a>/up/chunk        agent -> coordinator  binary chunks of the update blob
    takfl/<fleet>/agent/<a>/up/request      agent -> coordinator  ChunkRequest for the global blob
    takfl/<fleet>/agent/<a>/up/ack          agent -> coordinator  Ack of a task
    takfl/<fleet>/agent/<a>/up/release      agent -> coordinator  ReleaseReport (install steps)
    takfl/<fleet>/agent/<a>/up/secagg_keys    agent -> coordinator  SecAggKeys (secure rounds:
    takfl/<fleet>/agent/<a>/up/secagg_shares  agent -> coordinator  SecAggShares  takfl.wire.secure)
    takfl/<fleet>/agent/<a>/up/secagg_reveal  agent -> coordinator  SecAggReveal
    takfl/<fleet>/agent/<a>/down/task       coordinator -> agent  Task
    takfl/<fleet>/agent/<a>/down/chunk      coordinator -> agent  binary chunks of the global blob
    takfl/<fleet>/agent/<a>/down/request    coordinator -> agent  ChunkRequest for the update blob
    takfl/<fleet>/agent/<a>/down/ack        coordinator -> agent  Ack of a registration or update
    takfl/<fleet>/agent/<a>/down/global     coordinator -> agent  GlobalAnnouncement (retained)
    takfl/<fleet>/agent/<a>/down/release    coordinator -> agent  ReleaseOffer (artifacts follow
                                                                  as chunks on down/chunk)
    takfl/<fleet>/agent/<a>/down/secagg_roster  coordinator -> agent  SecAggRoster
    takfl/<fleet>/agent/<a>/down/secagg_shares  coordinator -> agent  SecAggDelivery
    takfl/<fleet>/agent/<a>/down/secagg_unmask  coordinator -> agent  SecAggUnmask
    takfl/<fleet>/broadcast/status          coordinator -> all    Status (retained; also last will)
    takfl/<fleet>/broadcast/global/<p>      coordinator -> all    GlobalAnnouncement (retained,
                                                                  unsigned: for monitors)

Every message on an agent's topics that a receiver acts on is signed with that agent's
secret (``takfl.wire.signing``); unsigned ones are ignored.

An agent writes only under its own ``up/`` and reads only its own ``down/`` and
``broadcast/``: the Mosquitto ACL (``coordinator.broker.mosquitto``) is built
from the filters below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from takfl.wire.errors import TopicError

ROOT = "takfl"
AGENT = "agent"
BROADCAST = "broadcast"
UP: Literal["up"] = "up"
DOWN: Literal["down"] = "down"
GLOBAL = "global"
STATUS = "status"

# Fleet, agent and prototype names: one topic level, no wildcards, no '%' (ACL patterns).
IDENT_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_IDENT = re.compile(IDENT_RE)

Direction = Literal["up", "down"]


class Up(str, Enum):
    """Leaves of an agent's ``up/`` tree (agent writes, coordinator reads)."""

    REGISTER = "register"
    STATUS = "status"
    UPDATE = "update"
    CHUNK = "chunk"
    REQUEST = "request"
    ACK = "ack"
    RELEASE = "release"
    SECAGG_KEYS = "secagg_keys"
    SECAGG_SHARES = "secagg_shares"
    SECAGG_REVEAL = "secagg_reveal"


class Down(str, Enum):
    """Leaves of an agent's ``down/`` tree (coordinator writes, agent reads)."""

    TASK = "task"
    CHUNK = "chunk"
    REQUEST = "request"
    ACK = "ack"
    GLOBAL = "global"
    RELEASE = "release"
    SECAGG_ROSTER = "secagg_roster"
    SECAGG_SHARES = "secagg_shares"
    SECAGG_UNMASK = "secagg_unmask"


def check_ident(value: str, what: str = "identifier") -> str:
    """``value`` if it is a valid fleet/agent/prototype name, else :class:`TopicError`."""
    if not isinstance(value, str) or _IDENT.fullmatch(value) is None:
        raise TopicError(
            f"{what} {value!r} is not valid: use 1-64 letters, digits, '_', '.', '-' "
            "starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names of one fleet."""

    fleet: str

    def __post_init__(self) -> None:
        check_ident(self.fleet, "fleet")

    @property
    def root(self) -> str:
        return f"{ROOT}/{self.fleet}"

    def _agent_tree(self, agent: str, direction: Direction) -> str:
        return f"{self.root}/{AGENT}/{agent}/{direction}"

    # -- concrete topics ------------------------------------------------------
    def up(self, agent: str, leaf: Up) -> str:
        """Topic an agent publishes ``leaf`` messages on."""
        return f"{self._agent_tree(check_ident(agent, 'agent id'), UP)}/{leaf.value}"

    def down(self, agent: str, leaf: Down) -> str:
        """Topic the coordinator publishes ``leaf`` messages to one agent on."""
        return f"{self._agent_tree(check_ident(agent, 'agent id'), DOWN)}/{leaf.value}"

    def coordinator_status(self) -> str:
        return f"{self.root}/{BROADCAST}/{STATUS}"

    def global_model(self, prototype: str) -> str:
        return f"{self.root}/{BROADCAST}/{GLOBAL}/{check_ident(prototype, 'prototype')}"

    # -- subscription filters -------------------------------------------------
    def up_filter(self, leaf: Up) -> str:
        """Every agent's ``leaf`` topic (the coordinator's subscription)."""
        return f"{self._agent_tree('+', UP)}/{leaf.value}"

    def down_filter(self, agent: str, leaf: Down) -> str:
        """One agent's ``leaf`` topic as a subscription filter (identical to the topic)."""
        return self.down(agent, leaf)

    def broadcast_filter(self) -> str:
        return f"{self.root}/{BROADCAST}/#"

    def fleet_filter(self) -> str:
        return f"{self.root}/#"

    def acl_tree(self, placeholder: str, direction: Direction) -> str:
        """``takfl/<fleet>/agent/<placeholder>/<direction>/#`` for ACL files (e.g. ``%u``)."""
        return f"{self._agent_tree(placeholder, direction)}/#"

    # -- parsing ----------------------------------------------------------------
    def agent_of(self, topic: str) -> str:
        """The agent id in a ``takfl/<fleet>/agent/<id>/...`` topic, else :class:`TopicError`."""
        parts = topic.split("/")
        if (
            len(parts) != 6
            or "/".join(parts[:2]) != self.root
            or parts[2] != AGENT
            or parts[4] not in (UP, DOWN)
        ):
            raise TopicError(f"{topic!r} is not an agent topic of fleet {self.fleet!r}")
        return check_ident(parts[3], "agent id")
