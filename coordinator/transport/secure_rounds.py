"""The coordinator's side of secure rounds over MQTT: one SecAgg+ server per prototype
and round, its stages closed as their messages arrive or their time runs out.

Broker-free, like the intake: each method takes what an agent sent and returns what to
publish (:class:`Outgoing`, signed by the transport); finished rounds come out of
:meth:`SecureRounds.results` as :class:`SecureSum` (the decoded sum, or the reason
there is none). Stages (``takfl.wire.secure``):

- **keys**: closes when every sampled client sent its keys, or at the tasks' deadline
  (the clients train first, so this is the round's training time);
- **shares**, **masked inputs**, **unmasking**: each closes when every client still in
  answered, or ``stage_timeout_s`` after it opened.

A masked input is folded into the running sum as it arrives and its bytes dropped; what
this unit keeps is what :class:`takfl.secagg.server.SecAggServer` keeps (public keys,
sealed shares it cannot open, the sum). A message out of order or from a client not in
the round is logged and ignored; it does not end the round for the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from coordinator.transport.base import SecureSum
from takfl.config.privacy import PrivacySpec
from takfl.secagg.messages import (
    KeysAdvert,
    MaskedInput,
    RoundParams,
    SealedShare,
    SecAggFailure,
    UnmaskReply,
    client_noise_std,
    encoding_bound,
    round_graph,
)
from takfl.secagg.server import SecAggServer, ServerStage
from takfl.secagg.vector import round_context
from takfl.wire.envelope import SignedMessage
from takfl.wire.messages import SecAggTask
from takfl.wire.reasons import ACCEPTED, Refusal, Verdict, refuse
from takfl.wire.secure import (
    PublicKeys,
    SecAggDelivery,
    SecAggKeys,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
)
from takfl.wire.topics import Down

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outgoing:
    """A message for one agent (unsigned: the transport signs it with the agent's secret)."""

    agent: str
    leaf: Down
    message: SignedMessage


@dataclass(kw_only=True)
class _Round:
    round_id: int
    prototype: str
    server: SecAggServer
    closes_at: float  # when the current stage closes without the clients still out
    answered: set[str] = field(default_factory=set)  # sent anything in any stage
    finished: bool = False


TOO_FEW_SAMPLED = "secure aggregation needs two or more sampled clients"


def round_noise(spec: PrivacySpec, sampled: int, noise_multiplier: float) -> float:
    """The noise each client of a round of ``sampled`` clients adds per coordinate under
    distributed DP (0 without it): from the round's threshold and the clipping bound."""
    _, t = round_graph(sampled, spec.secagg.neighbours, spec.secagg.threshold)
    return client_noise_std(noise_multiplier, spec.secagg.clip_norm, t)


def round_params(
    spec: PrivacySpec,
    run: str,
    round_id: int,
    prototype: str,
    clients: Sequence[str],
    length: int,
    noise_multiplier: float = 0.0,
) -> RoundParams:
    """The public parameters of one prototype's secure round among ``clients`` (two or
    more, sorted): the graph, the threshold, the group and the encoding's bound."""
    s = spec.secagg
    k, t = round_graph(len(clients), s.neighbours, s.threshold)
    noise = round_noise(spec, len(clients), noise_multiplier)
    return RoundParams(
        context=round_context(run, round_id, prototype),
        clients=tuple(clients),
        neighbours=k,
        threshold=t,
        bits=s.bits,
        bound=encoding_bound(s.clip_norm, noise),
        length=length,
    )


def input_words(blob: bytes, params: RoundParams) -> np.ndarray | None:
    """A masked input blob as the group's words (None: not ``length`` words)."""
    dtype = params.encoding.dtype
    if len(blob) != dtype.itemsize * params.length:
        return None
    return np.frombuffer(blob, dtype=dtype.newbyteorder("<")).astype(dtype)


class SecureRounds:
    """Every open secure round of a run (at most one per prototype)."""

    def __init__(
        self, spec: PrivacySpec, run: str, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.spec = spec
        self.run = run
        self.clock = clock
        self._rounds: dict[str, _Round] = {}  # prototype -> its open round
        self._results: list[SecureSum] = []

    # -- opening -----------------------------------------------------------------------
    def open(
        self,
        round_id: int,
        prototype: str,
        clients: list[str],
        length: int,
        keys_s: float,
        noise_multiplier: float = 0.0,
    ) -> dict[str, SecAggTask]:
        """Open ``prototype``'s round among ``clients`` (a round of it still open ends
        with ``failure``); returns each client's ``task.secagg``. ``keys_s``: seconds
        until the keys stage closes (the tasks' deadline); ``noise_multiplier``: the sum's
        z under distributed DP (each client adds its share; 0: none)."""
        old = self._rounds.pop(prototype, None)
        if old is not None and not old.finished:
            self._finish(old, failure=f"round {round_id} began before round {old.round_id} ended")
        clients = sorted(set(clients))
        if len(clients) < 2:
            self._results.append(
                SecureSum(
                    round_id=round_id,
                    prototype=prototype,
                    clients=(),
                    answered=(),
                    failure=TOO_FEW_SAMPLED,
                )
            )
            return {}
        s = self.spec.secagg
        params = round_params(
            self.spec, self.run, round_id, prototype, clients, length, noise_multiplier
        )
        noise = round_noise(self.spec, len(clients), noise_multiplier)
        self._rounds[prototype] = _Round(
            round_id=round_id,
            prototype=prototype,
            server=SecAggServer(params),
            closes_at=self.clock() + keys_s,
        )
        return {
            c: SecAggTask(
                neighbours=sorted(params.neighbours_of(c)),
                threshold=params.threshold,
                clients=len(clients),
                bits=s.bits,
                clip_norm=s.clip_norm,
                length=length,
                noise_std=noise,
            )
            for c in clients
        }

    def _round(self, round_id: int, prototype: str) -> _Round | None:
        r = self._rounds.get(prototype)
        return r if r is not None and r.round_id == round_id and not r.finished else None

    # -- what agents send --------------------------------------------------------------
    def keys(self, agent: str, msg: SecAggKeys) -> list[Outgoing]:
        r = self._round(msg.round_id, msg.prototype)
        if r is None:
            return self._stray(agent, msg)
        advert = KeysAdvert(agent, bytes.fromhex(msg.channel_key), bytes.fromhex(msg.mask_key))
        if not self._take(r, agent, lambda: r.server.add_keys(advert)):
            return []
        if len(r.server.keys) == len(r.server.params.clients):
            return self._close(r)
        return []

    def shares(self, agent: str, msg: SecAggShares) -> list[Outgoing]:
        r = self._round(msg.round_id, msg.prototype)
        if r is None:
            return self._stray(agent, msg)
        sealed = [SealedShare(agent, to, bytes.fromhex(h)) for to, h in sorted(msg.shares.items())]
        if not self._take(r, agent, lambda: r.server.add_shares(agent, sealed)):
            return []
        if r.server.shared == set(r.server.keys):
            return self._close(r)
        return []

    def masked_input(
        self, agent: str, round_id: int, prototype: str, blob: bytes
    ) -> tuple[Verdict, list[Outgoing]]:
        """Fold ``agent``'s masked input (an update blob) into its round's sum."""
        r = self._round(round_id, prototype)
        if r is None or r.server.stage is not ServerStage.INPUTS:
            return refuse(Refusal.STALE_ROUND, "its secure round is not taking inputs"), []
        words = input_words(blob, r.server.params)
        if words is None:
            return refuse(Refusal.MALFORMED, "a masked input of the wrong length"), []
        if not self._take(r, agent, lambda: r.server.add_input(MaskedInput(agent, words))):
            return refuse(Refusal.NOT_ASSIGNED, "not expected in this secure round's inputs"), []
        if r.server.inputs == r.server.shared:
            return ACCEPTED, self._close(r)
        return ACCEPTED, []

    def reveal(self, agent: str, msg: SecAggReveal) -> list[Outgoing]:
        r = self._round(msg.round_id, msg.prototype)
        if r is None:
            return self._stray(agent, msg)
        reply = UnmaskReply(
            agent,
            {o: (s.index, bytes.fromhex(s.share)) for o, s in msg.seeds.items()},
            {o: (s.index, bytes.fromhex(s.share)) for o, s in msg.keys.items()},
        )
        if not self._take(r, agent, lambda: r.server.add_unmasking(reply)):
            return []
        if set(r.server.replies) == r.server.inputs:
            return self._close(r)
        return []

    def _take(self, r: _Round, agent: str, add: Callable[[], None]) -> bool:
        try:
            add()
        except SecAggFailure as e:
            log.warning("secure round %d of %s: ignored %s: %s", r.round_id, r.prototype, agent, e)
            return False
        r.answered.add(agent)
        return True

    def _stray(self, agent: str, msg: SignedMessage) -> list[Outgoing]:
        log.info("ignored %s from %s: its secure round is not open", msg.__class__.__name__, agent)
        return []

    # -- closing stages ----------------------------------------------------------------
    def tick(self) -> list[Outgoing]:
        """Close every stage whose time ran out."""
        now = self.clock()
        out: list[Outgoing] = []
        for r in list(self._rounds.values()):
            if not r.finished and now >= r.closes_at:
                out += self._close(r)
        return out

    def _close(self, r: _Round) -> list[Outgoing]:
        """Close ``r``'s current stage: the next stage's messages, or its result."""
        server, p = r.server, r.server.params
        stage = server.stage
        base = {"run": self.run, "round_id": r.round_id, "prototype": r.prototype}
        r.closes_at = self.clock() + self.spec.secagg.stage_timeout_s
        try:
            if stage is ServerStage.KEYS:
                return [
                    Outgoing(
                        c,
                        Down.SECAGG_ROSTER,
                        SecAggRoster(
                            **base,
                            agent_id=c,
                            keys={
                                n: PublicKeys(channel_key=ch.hex(), mask_key=mk.hex())
                                for n, (ch, mk) in sorted(keys.items())
                            },
                        ),
                    )
                    for c, keys in sorted(server.rosters().items())
                ]
            if stage is ServerStage.SHARES:
                return [
                    Outgoing(
                        c,
                        Down.SECAGG_SHARES,
                        SecAggDelivery(
                            **base,
                            agent_id=c,
                            shares={s.sender: s.sealed.hex() for s in sorted(got, key=_sender)},
                        ),
                    )
                    for c, got in sorted(server.deliveries().items())
                ]
            if stage is ServerStage.INPUTS:
                request = server.unmask_request()
                survivors, dropped = set(request.survivors), set(request.dropped)
                out = []
                for c in request.survivors:
                    near = set(p.neighbours_of(c))
                    msg = SecAggUnmask(
                        **base,
                        agent_id=c,
                        survivors=sorted((near | {c}) & survivors),
                        dropped=sorted(near & dropped),
                        inputs=len(survivors),
                    )
                    out.append(Outgoing(c, Down.SECAGG_UNMASK, msg))
                return out
            if stage is ServerStage.UNMASKING:
                total = server.result()
                self._finish(r, total=total)
                return []
        except SecAggFailure as e:
            self._finish(r, failure=f"{e.reason.value}: {e.detail}")
        return []

    def _finish(
        self, r: _Round, *, total: np.ndarray | None = None, failure: str | None = None
    ) -> None:
        r.finished = True
        clients = tuple(sorted(r.server.inputs)) if total is not None else ()
        if failure is not None:
            log.warning("secure round %d of %s failed: %s", r.round_id, r.prototype, failure)
        self._results.append(
            SecureSum(
                round_id=r.round_id,
                prototype=r.prototype,
                clients=clients,
                answered=tuple(sorted(r.answered)),
                total=total,
                failure=failure,
            )
        )

    def results(self) -> list[SecureSum]:
        """The rounds finished since the last call."""
        out, self._results = self._results, []
        return out


def _sender(share: SealedShare) -> str:
    return share.sender
