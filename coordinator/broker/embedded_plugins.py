"""amqtt plugins of the embedded broker: password logins and the fleet's topic rules.

amqtt builds each plugin from its dotted name and a config dict (checked against the
plugin's ``Config`` dataclass); :func:`plugin_configs` turns a :class:`BrokerAccess` into
those dicts. Passwords are kept as SHA-256 digests and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from coordinator.broker.acl import BrokerAccess, FleetAcl, Grant

log = logging.getLogger(__name__)

AUTH_PLUGIN = f"{__name__}.PasswordAuthPlugin"
TOPIC_PLUGIN = f"{__name__}.FleetTopicPlugin"
_ACTIONS: dict[Action, Literal["read", "write"]] = {
    Action.PUBLISH: "write",
    Action.SUBSCRIBE: "read",
    Action.RECEIVE: "read",
}


def _digest(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def plugin_configs(access: BrokerAccess) -> tuple[dict[str, Any], dict[str, Any]]:
    """Config dicts of the auth plugin and of the topic plugin."""
    auth = {
        "passwords": {u: _digest(p) for u, p in access.passwords.items()},
        "agents": sorted(access.acl.agents),
    }
    topics = {
        "fleet": access.acl.fleet,
        "grants": {
            u: [f"{g.access} {g.pattern}" for g in grants]
            for u, grants in access.acl.grants.items()
        },
        "agents": sorted(access.acl.agents),
    }
    return auth, topics


class PasswordAuthPlugin(BaseAuthPlugin):
    """A client logs in with a known username and its password; agents must use their
    agent id as client id (Mosquitto: ``use_username_as_clientid``)."""

    @dataclass
    class Config:
        passwords: dict[str, str] = field(default_factory=dict)  # username -> sha256 hex
        agents: list[str] = field(default_factory=list)

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._agents = frozenset(self.config.agents)

    async def authenticate(self, *, session: Session) -> bool | None:
        user = session.username
        known = self.config.passwords.get(user or "")
        given = _digest(session.password or "")
        if user is None or known is None or not hmac.compare_digest(known, given):
            log.warning("embedded broker: refused login of %r (client %r)", user, session.client_id)
            return False
        if user in self._agents and session.client_id != user:
            log.warning(
                "embedded broker: agent %r must connect with client id %r, not %r",
                user,
                user,
                session.client_id,
            )
            return False
        return True


class FleetTopicPlugin(BaseTopicPlugin):
    """Publish, subscribe and receive only where the user's grants allow."""

    @dataclass
    class Config:
        fleet: str = ""
        grants: dict[str, list[str]] = field(default_factory=dict)  # user -> "access pattern"
        agents: list[str] = field(default_factory=list)

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        grants: dict[str, tuple[Grant, ...]] = {}
        for user, entries in self.config.grants.items():
            parsed = []
            for entry in entries:
                access, pattern = entry.split(" ", 1)
                if access not in ("read", "write", "readwrite"):
                    raise ValueError(f"bad access {access!r} for {user!r}")
                parsed.append(Grant(access, pattern))
            grants[user] = tuple(parsed)
        self.acl = FleetAcl(self.config.fleet, grants, frozenset(self.config.agents))

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        if session is None or topic is None or action is None:
            return False
        allowed = self.acl.allows(session.username, topic, _ACTIONS[action])
        if not allowed and action != Action.RECEIVE:
            log.warning(
                "embedded broker: %r may not %s %s", session.username, _ACTIONS[action], topic
            )
        return allowed
