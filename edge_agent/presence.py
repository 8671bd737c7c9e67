"""When an agent registers, which registration acks are its own, and which of the
coordinator's messages belong to the run they concern. No broker, no threads of its own:
:class:`edge_agent.link.AgentLink` asks and publishes.

Registration follows the coordinator's presence: an agent registers once per pair of
(its connection, the coordinator's connection). On every connect of the agent the
coordinator's retained ``online`` status arrives with the subscription; when the
coordinator reconnects it publishes a new one (another ``time``). Either way the agent
registers then, and never with a coordinator that says it is ``offline`` (it would not
hear it). Registrations are not retained, so none outlives the connection it was for.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from takfl.wire.errors import UnsupportedVersion, WireError
from takfl.wire.messages import Ack, Registration, Status, decode_message
from takfl.wire.signing import message_ref

log = logging.getLogger(__name__)
REMEMBERED = 8  # recent registrations whose acks are accepted


def coordinator_presence(payload: bytes) -> tuple[str, float] | None:
    """(state, time) of the coordinator's status, of any protocol version (its ``state``
    and ``time`` mean the same in every major, so an agent of another major registers,
    and hears why it is refused), or None when unreadable."""
    try:
        status = decode_message(Status, payload)
    except UnsupportedVersion as e:
        state, at = e.received.get("state"), e.received.get("time")
        if state in ("online", "offline") and isinstance(at, int | float):
            return str(state), float(at)
        return None
    except WireError as e:
        log.info("unreadable coordinator status: %s", e)
        return None
    return status.state, status.time


class RegistrationBook:
    """Decides when to register; knows the last registrations' references. Thread-safe."""

    def __init__(self, remembered: int = REMEMBERED) -> None:
        self._refs: deque[str] = deque(maxlen=remembered)
        self._coordinator_time: float | None = None  # connection registered with
        self._lock = threading.Lock()

    def connected(self) -> None:
        """This agent (re)connected: register with whichever coordinator is online."""
        with self._lock:
            self._coordinator_time = None

    def coordinator(self, state: str, at: float) -> bool:
        """The coordinator's status (``state``, connection ``time`` ``at``) arrived; True
        when the agent should register now."""
        if state != "online":
            return False
        with self._lock:
            if at == self._coordinator_time:
                return False
            self._coordinator_time = at
            return True

    def sent(self, registration: Registration) -> None:
        """``registration`` was published: its ack will name it."""
        with self._lock:
            self._refs.append(message_ref(registration))

    def answers(self, ack: Ack) -> bool:
        """True if ``ack`` (of a registration) answers one of the last registrations."""
        with self._lock:
            return ack.digest in self._refs


class RunFilter:
    """Counts and logs the coordinator's messages that belong to another run than the one
    they concern (an ack of an update, a request for its chunks, a global announcement)."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.ignored = 0

    def accepts(self, what: str, run: str, expected: str | None) -> bool:
        """True when ``run`` is ``expected`` (or nothing is expected)."""
        if expected is None or run == expected:
            return True
        self.ignored += 1
        log.info("%s: ignored a %s of run %r (expected %r)", self.agent_id, what, run, expected)
        return False
