"""One SecAgg+ round between a server and its clients in one process: the four stages
in order, with clients dropping out where told. For tests and the cost benchmark; the
coordinator and agents run the same state machines over MQTT."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from takfl.secagg.client import SecAggClient
from takfl.secagg.messages import RoundParams
from takfl.secagg.server import SecAggServer


@dataclass(kw_only=True)
class Dropouts:
    """Clients that stop answering before a stage (the stage's message never arrives)."""

    before_keys: frozenset[str] = frozenset()
    before_shares: frozenset[str] = frozenset()
    before_input: frozenset[str] = frozenset()
    before_unmasking: frozenset[str] = frozenset()


@dataclass(kw_only=True)
class RoundTrace:
    """What crossed the wire, in bytes per stage, and the server used. Payloads only: public
    keys 32 bytes each, sealed shares as sealed, masked inputs as their words, share
    indices 2 bytes, client names as UTF-8; no message framing or signatures."""

    server: SecAggServer
    upload: dict[str, int] = field(default_factory=dict)  # stage -> bytes clients sent
    download: dict[str, int] = field(default_factory=dict)  # stage -> bytes the server sent


def run_round(
    params: RoundParams, updates: Mapping[str, np.ndarray], drop: Dropouts | None = None
) -> tuple[np.ndarray, RoundTrace]:
    """The sum of the surviving clients' clipped ``updates`` and the round's trace.

    Raises:
        SecAggFailure: too many dropped (the reason names the stage).
    """
    drop = drop or Dropouts()
    server = SecAggServer(params)
    trace = RoundTrace(server=server)
    clients = {c: SecAggClient(c, params) for c in params.clients if c not in drop.before_keys}
    for c in clients.values():
        server.add_keys(c.advertise())
    trace.upload["keys"] = 64 * len(clients)
    rosters = server.rosters()
    trace.download["keys"] = sum(64 + len(n.encode()) for r in rosters.values() for n in r)
    alive = {c: clients[c] for c in rosters if c not in drop.before_shares}
    for name, c in alive.items():
        shares = c.share(rosters[name])
        server.add_shares(name, shares)
        trace.upload["shares"] = trace.upload.get("shares", 0) + sum(len(s.sealed) for s in shares)
    deliveries = server.deliveries()
    trace.download["shares"] = sum(len(s.sealed) for v in deliveries.values() for s in v)
    alive = {c: alive[c] for c in deliveries if c not in drop.before_input}
    for name, c in alive.items():
        msg = c.mask(updates[name], deliveries[name])
        server.add_input(msg)
        trace.upload["input"] = trace.upload.get("input", 0) + msg.masked.nbytes
    request = server.unmask_request()
    alive = {c: alive[c] for c in request.survivors if c not in drop.before_unmasking}
    names = sum(len(n.encode()) for n in (*request.survivors, *request.dropped))
    trace.download["unmasking"] = names * len(alive)
    for c in alive.values():
        reply = c.unmask(request)
        server.add_unmasking(reply)
        size = sum(2 + len(s) for _, s in [*reply.seed_shares.values(), *reply.key_shares.values()])
        trace.upload["unmasking"] = trace.upload.get("unmasking", 0) + size
    return server.result(), trace
