"""What an agent waiting on its broker or coordinator tells its user, with the fix.

``LinkWatch`` is fed facts (a refused connection, a refused publish, the state of the
connection at a tick) and returns the lines to report; it keeps no connection of its own, so
it is tested without a broker. A problem is reported once when it starts, a wait again each
time it has lasted twice as long.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# CONNACK reasons that mean the credentials are wrong (MQTT 5 and 3.1.1 wordings)
CREDENTIAL_REASONS = ("Not authorized", "Bad user name or password", "Bad username or password")


def refusal_fix(reason: str, agent_id: str) -> str:
    if any(r.lower() in reason.lower() for r in CREDENTIAL_REASONS):
        return (
            f"use the --id and --secret-file that `takfl-coordinator provision` wrote for "
            f"{agent_id}, with the broker's password file from the same provisioning"
        )
    return "check the broker's log for why it refuses this client"


@dataclass(kw_only=True)
class LinkWatch:
    """Turns what the agent's connection saw into reports a user can act on."""

    agent_id: str
    fleet: str
    broker: str  # host:port, for the messages
    started: float  # monotonic time the agent started
    patience_s: float = 60.0  # silence tolerated before the first report
    _reported: set[str] = field(default_factory=set)
    _next_wait_report: float | None = None
    _waiting_for: str | None = None
    _since: float | None = None  # when the current wait began
    _first_wait: bool = True  # the first wait began when the agent started

    def refused(self, reason: str) -> str | None:
        """The broker answered CONNECT with ``reason``; reported once per reason."""
        key = f"refused:{reason}"
        if key in self._reported:
            return None
        self._reported.add(key)
        return (
            f"the broker at {self.broker} refused agent {self.agent_id}: {reason}. "
            f"Fix: {refusal_fix(reason, self.agent_id)}."
        )

    def denied(self, topic: str, reason: str) -> str | None:
        """The broker refused a message on ``topic``; reported once per topic."""
        key = f"denied:{topic}"
        if key in self._reported:
            return None
        self._reported.add(key)
        return (
            f"the broker refused a message of agent {self.agent_id} on {topic}: {reason}. "
            f"Fix: the broker's ACL lets an agent write only under its own fleet's topics; "
            f"check that --fleet {self.fleet} is the coordinator's fleet (its federation's "
            f"name or its --fleet) and that {self.agent_id} was provisioned for it."
        )

    def tick(
        self, now: float, *, connected: bool, registered: bool, last_error: str | None
    ) -> str | None:
        """A report when the agent has waited ``patience_s`` (then 2x, 4x, ...) without a
        connection, or connected without an answer from a coordinator of its fleet."""
        if registered:
            self._waiting_for = None
            self._first_wait = False
            return None
        waiting_for = "broker" if not connected else "coordinator"
        if waiting_for != self._waiting_for:
            self._waiting_for = waiting_for
            self._since = self.started if self._first_wait else now
            self._first_wait = False
            self._next_wait_report = self._since + self.patience_s
        if self._since is None or self._next_wait_report is None or now < self._next_wait_report:
            return None
        waited = now - self._since
        self._next_wait_report = now + max(waited, self.patience_s)
        if waiting_for == "broker":
            return (
                f"no connection to the broker at {self.broker} for {waited:.0f} s "
                f"({last_error or 'no answer'}). Fix: check the broker's address and port, "
                "that it runs and that the network lets this device reach it (for mqtts: "
                "--ca-file)."
            )
        return (
            f"connected to {self.broker}, but no coordinator of fleet {self.fleet} has "
            f"answered agent {self.agent_id} for {waited:.0f} s. Fix: start `takfl-coordinator "
            f"serve` for this fleet on this broker, or correct --fleet (now {self.fleet})."
        )
