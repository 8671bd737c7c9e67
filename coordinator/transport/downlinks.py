"""Which global model goes down to which agent: the full model, or a delta against the
model the agent is known to hold (:mod:`takfl.wire.downlink`).

One instance per transport (the in-process one of a simulation, the MQTT one of a real
federation). It keeps, per agent, the model digest the agent is known to hold (over
MQTT: the base of its last accepted update; in a simulation: what it was sent), the held
models themselves by digest (each shared by every agent holding it), and this round's
blobs per (prototype, base), so that agents holding the same model share one encoding.
A prototype with no downstream codec gets the full model every round, as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

from takfl.state import State
from takfl.wire.codecs import Codec
from takfl.wire.downlink import Downlink, delta_downlink, full_downlink
from takfl.wire.errors import CodecError

log = logging.getLogger(__name__)

# held models kept per prototype as bases for deltas (the newest): an agent holding an
# older one gets the full model, so a round sends at most this many deltas and one full
# blob per prototype (the MQTT transport keeps 16 blobs to answer chunk requests)
MAX_BASES = 4


class Downlinks:
    """Thread-safe (engine thread plans, the dispatcher thread records what agents hold)."""

    def __init__(
        self, codecs: Mapping[str, Codec] | None = None, *, default: Codec | None = None
    ) -> None:
        self.codecs = dict(codecs or {})  # prototype -> its downstream codec
        self.default = default  # for a prototype not in ``codecs`` (None: full models)
        self._held: dict[str, str] = {}  # agent -> model digest it holds
        self._models: dict[str, State] = {}  # model digest -> state (sent, maybe held)
        self._made: dict[str, tuple[str, int]] = {}  # model digest -> (prototype, round)
        self._plans: dict[tuple[int, str, str | None], Downlink] = {}
        self._round = -1
        self._lock = threading.Lock()

    def codec(self, prototype: str) -> Codec | None:
        return self.codecs.get(prototype, self.default)

    def held(self, agent: str) -> str | None:
        with self._lock:
            return self._held.get(agent)

    def holds(self, agent: str, digest: str) -> None:
        """``agent`` is known to hold the model ``digest`` (one this instance sent)."""
        with self._lock:
            if digest in self._models:
                self._held[agent] = digest

    def forget(self, agent: str) -> None:
        """``agent`` does not hold what it was thought to (it refused a delta): its next
        model goes down in full."""
        with self._lock:
            self._held.pop(agent, None)

    def plan(self, round_id: int, prototype: str, agent: str, global_state: State) -> Downlink:
        """What ``agent`` is sent in round ``round_id``: a delta against the model it holds
        when its prototype has a downstream codec, else (or when it holds none, or the
        layouts differ) the full model. Agents that hold the same model share one plan."""
        codec = self.codec(prototype)
        with self._lock:
            if round_id != self._round:
                self._new_round(round_id)
            base = self._held.get(agent) if codec is not None else None
            key = (round_id, prototype, base)
            plan = self._plans.get(key)
            if plan is not None:
                return plan
            base_state = self._models.get(base) if base is not None else None
        plan = None
        if codec is not None and base is not None and base_state is not None:
            try:
                plan = delta_downlink(global_state, base_state, base, codec, seed=round_id)
            except CodecError as e:  # the prototype's model changed shape
                log.info("%s: full model instead of a delta against %s: %s", agent, base[:12], e)
        if plan is None:
            plan = full_downlink(global_state)
        with self._lock:
            self._plans[key] = plan
            self._models.setdefault(plan.digest, plan.state)
            self._made.setdefault(plan.digest, (prototype, round_id))
        return plan

    def _new_round(self, round_id: int) -> None:
        """Drop last round's plans, every model no agent holds, and all but the newest
        :data:`MAX_BASES` held models of each prototype (lock held)."""
        self._round = round_id
        self._plans = {k: v for k, v in self._plans.items() if k[0] >= round_id}
        by_proto: dict[str, list[tuple[int, str]]] = {}
        for digest in set(self._held.values()):
            proto, made = self._made[digest]
            by_proto.setdefault(proto, []).append((made, digest))
        keep = {p.digest for p in self._plans.values()}
        for held in by_proto.values():
            keep |= {d for _, d in sorted(held, reverse=True)[:MAX_BASES]}
        self._held = {a: d for a, d in self._held.items() if d in keep}
        self._models = {d: s for d, s in self._models.items() if d in keep}
        self._made = {d: m for d, m in self._made.items() if d in keep}

    def model(self, digest: str) -> State | None:
        with self._lock:
            return self._models.get(digest)
