"""The agent's side of a secure round (``task.secagg``; :mod:`takfl.wire.secure`).

After training, the agent clips its delta to the task's bound (and under distributed DP
adds its share of the noise), then runs SecAgg+'s four
stages with the coordinator: its public keys up; its neighbours' keys down; its
secrets' shares, sealed per neighbour, up; the shares sealed to it down; its masked
input up as the update blob; which neighbours sent inputs down; the shares that unmask
the sum up. The coordinator never sees the update itself.

:class:`SecureInbox` holds the coordinator's secure-round messages as the link's
dispatcher thread receives them; :func:`run_secure_round` runs on the agent's task
thread and waits for each. A stage that never comes (the round failed for too few
clients, or a new task arrived) ends the session quietly: the round goes on without
this agent, as with a dropout.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from takfl.secagg.client import SecAggClient, clip_vector, noised_input
from takfl.secagg.messages import (
    RoundParams,
    SealedShare,
    SecAggFailure,
    UnmaskRequest,
    encoding_bound,
)
from takfl.secagg.vector import delta_vector, round_context
from takfl.wire.envelope import SignedMessage
from takfl.wire.messages import TaskMessage, UpdateHeader
from takfl.wire.secure import (
    RevealedShare,
    SecAggDelivery,
    SecAggKeys,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
)
from takfl.wire.telemetry import Telemetry
from takfl.wire.topics import Up
from takfl.wire.update import PreparedUpdate, prepare_blob

log = logging.getLogger(__name__)
M = TypeVar("M", bound=SignedMessage)
WAIT_SLICE_S = 0.5
# after the task's deadline, how long a stage's message is waited for at most (the
# coordinator's stage timeout is 60 s by default; the keys stage closes at the deadline)
STAGE_PATIENCE_S = 900.0


class SecureInbox:
    """The latest secure-round message of each kind and (round, prototype)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: dict[tuple[type, int, str], SignedMessage] = {}

    def put(self, message: SecAggRoster | SecAggDelivery | SecAggUnmask) -> None:
        with self._cond:
            key = (type(message), message.round_id, message.prototype)
            self._held[key] = message
            # keep only the newest round's messages
            newest = max(k[1] for k in self._held)
            self._held = {k: v for k, v in self._held.items() if k[1] >= newest}
            self._cond.notify_all()

    def wait(
        self, cls: type[M], round_id: int, prototype: str, until: float, give_up: Callable[[], bool]
    ) -> M | None:
        """The ``cls`` message of the round, or None once ``until`` (unix time) passed or
        ``give_up()`` says so."""
        key = (cls, round_id, prototype)
        with self._cond:
            while key not in self._held:
                if time.time() >= until or give_up():
                    return None
                self._cond.wait(WAIT_SLICE_S)
            msg = self._held.pop(key)
        assert isinstance(msg, cls)
        return msg


@dataclass(frozen=True, kw_only=True)
class SecureSend:
    """How the session reaches the coordinator: ``publish(leaf, message)`` signs and
    publishes a control message; ``send_update`` sends a prepared update (header and
    chunks, re-announced until acknowledged)."""

    publish: Callable[[Up, SignedMessage], None]
    send_update: Callable[[PreparedUpdate, float], UpdateHeader]
    secret: bytes


def params_of(task: TaskMessage) -> RoundParams:
    """The round as this agent sees it: itself and its neighbours (the full graph among
    them), with the round's n for the encoding."""
    spec = task.secagg
    if spec is None:
        raise ValueError("not a task of a secure round")
    return RoundParams(
        context=round_context(task.run, task.round_id, task.prototype),
        clients=tuple(sorted({task.agent_id, *spec.neighbours})),
        neighbours=len(spec.neighbours),
        threshold=spec.threshold,
        bits=spec.bits,
        bound=encoding_bound(spec.clip_norm, spec.noise_std),
        length=spec.length,
        population=spec.clients,
    )


def run_secure_round(
    task: TaskMessage,
    trained: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    inbox: SecureInbox,
    send: SecureSend,
    *,
    num_samples: int,
    metrics: Mapping[str, float] | None = None,
    telemetry: Telemetry | None = None,
    give_up: Callable[[], bool] = lambda: False,
) -> UpdateHeader | None:
    """Take part in ``task``'s secure round with ``trained - base``; returns the header of
    the masked input sent (None: the round went on without this agent, logged).

    Raises:
        ValueError: the trained model does not fit the task's secure round.
    """
    spec = task.secagg
    if spec is None:
        raise ValueError("not a task of a secure round")
    vector = delta_vector(trained, base)
    if vector.size != spec.length:
        raise ValueError(f"the model has {vector.size} values, the secure round {spec.length}")
    params = params_of(task)
    me, rid, proto = task.agent_id, task.round_id, task.prototype
    client = SecAggClient(me, params)
    until = max(task.deadline, time.time()) + STAGE_PATIENCE_S
    base_fields = {"run": task.run, "agent_id": me, "round_id": rid, "prototype": proto}

    def wait(cls: type[M], stage: str) -> M | None:
        msg = inbox.wait(cls, rid, proto, until, give_up)
        if msg is None:
            log.warning("%s: round %d: no %s came; the round goes on without me", me, rid, stage)
        return msg

    try:
        advert = client.advertise()
        send.publish(
            Up.SECAGG_KEYS,
            SecAggKeys(
                **base_fields,
                channel_key=advert.channel_key.hex(),
                mask_key=advert.mask_key.hex(),
            ),
        )
        roster = wait(SecAggRoster, "roster of neighbours' keys")
        if roster is None:
            return None
        keys = {
            n: (bytes.fromhex(k.channel_key), bytes.fromhex(k.mask_key))
            for n, k in roster.keys.items()
        }
        sealed = client.share(keys)
        send.publish(
            Up.SECAGG_SHARES,
            SecAggShares(**base_fields, shares={s.receiver: s.sealed.hex() for s in sealed}),
        )
        delivery = wait(SecAggDelivery, "delivery of shares")
        if delivery is None:
            return None
        got = [SealedShare(s, me, bytes.fromhex(h)) for s, h in sorted(delivery.shares.items())]
        # distributed DP: its share of the noise, drawn from the system's entropy
        rng = np.random.default_rng(secrets.randbits(128))
        x = noised_input(clip_vector(vector, spec.clip_norm), spec.noise_std, params.bound, rng)
        masked = client.mask(x, got)
        words = params.encoding.dtype.newbyteorder("<")
        blob = masked.masked.astype(words).tobytes()
        prepared = prepare_blob(
            task,
            blob,
            secret=send.secret,
            num_samples=num_samples,
            metrics=metrics,
            telemetry=telemetry,
        )
        sent = send.send_update(prepared, until)
        unmask = wait(SecAggUnmask, "unmasking request")
        if unmask is None:
            return sent
        if unmask.inputs < max(2, spec.threshold):
            log.warning("%s: round %d: %d inputs only; revealing nothing", me, rid, unmask.inputs)
            return sent
        reply = client.unmask(UnmaskRequest(tuple(unmask.survivors), tuple(unmask.dropped)))
        send.publish(
            Up.SECAGG_REVEAL,
            SecAggReveal(
                **base_fields,
                seeds={
                    o: RevealedShare(index=i, share=s.hex())
                    for o, (i, s) in reply.seed_shares.items()
                },
                keys={
                    o: RevealedShare(index=i, share=s.hex())
                    for o, (i, s) in reply.key_shares.items()
                },
            ),
        )
        return sent
    except SecAggFailure as e:
        log.warning("%s: round %d: secure aggregation stopped: %s", me, rid, e)
        return None
