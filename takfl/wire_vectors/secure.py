"""Golden vectors of one secure round (``takfl.wire.secure``): three clients, the
vectors' agent and two neighbours, every key, seed, share and nonce fixed, so that an
implementation can rebuild each message, the masked input and the sum byte for byte.

Randomness is fixed only while the vectors are built: the X25519 keys and self-mask
seeds come from labels, the AES-GCM nonces and the Shamir polynomials' coefficients
from a counter (pycryptodome's ``Shamir.split`` draws its coefficients through the
module's ``rng``, replaced here for the duration).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import numpy as np

from takfl.secagg.client import SecAggClient, clip_vector
from takfl.secagg.crypto import KeyPair, public_of
from takfl.secagg.messages import RoundParams
from takfl.secagg.server import SecAggServer
from takfl.secagg.vector import round_context
from takfl.wire.chunking import blob_ref
from takfl.wire.messages import SecAggTask, TaskMessage, UpdateHeader
from takfl.wire.secure import (
    SECURE_COMPRESSION,
    PublicKeys,
    RevealedShare,
    SecAggDelivery,
    SecAggKeys,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
)
from takfl.wire.topics import Down, Topics, Up
from takfl.wire_vectors.fixed import (
    AGENT,
    AGENT_SIDE,
    CHUNK_SIZE,
    COORDINATOR,
    FLEET,
    NUM_SAMPLES,
    PROTOTYPE,
    ROUND,
    RUN,
    Files,
    Vector,
    signed_vector,
    stamp,
)

TOPICS = Topics(FLEET)
CLIENTS = (AGENT, "S-001", "S-002")
THRESHOLD, BITS, CLIP = 2, 32, 5.0
# the clients' clipped deltas (S-002's is clipped: its norm is 6)
INPUTS = {
    AGENT: [0.5, -1.25, 0.0, 2.0, -0.125, 1.0],
    "S-001": [-0.75, 0.5, 1.5, -2.5, 0.25, 0.0],
    "S-002": [3.0, 0.0, -3.0, 3.0, 3.0, 0.0],
}


def _bytes(label: str, n: int = 32) -> bytes:
    return hashlib.sha256(f"takfl secagg vector {label}".encode()).digest()[:n]


def _pair(label: str) -> KeyPair:
    private = _bytes(label)
    return KeyPair(private, public_of(private))


@contextmanager
def _fixed_randomness() -> Iterator[None]:
    """AES-GCM nonces (``os.urandom`` in ``seal``) and Shamir coefficients from counters."""
    counter = iter(range(1_000_000))

    def draw(n: int) -> bytes:
        return _bytes(f"random {next(counter)}", n)

    with (
        mock.patch("os.urandom", draw),
        mock.patch("Crypto.Protocol.SecretSharing.rng", draw),
    ):
        yield


def _client(name: str, params: RoundParams) -> SecAggClient:
    client = SecAggClient(name, params)
    client._channel = _pair(f"{name} channel key")
    client._mask = _pair(f"{name} mask key")
    client._seed = _bytes(f"{name} self-mask seed")
    return client


def secure_vectors(task: TaskMessage) -> tuple[dict[str, Vector], Files, dict[str, Any]]:
    """The vectors of one secure round seen by ``AGENT``, its masked input blob, and the
    manifest's ``secagg`` entry (every secret and intermediate value)."""
    context = round_context(RUN, ROUND, PROTOTYPE)
    length = len(INPUTS[AGENT])
    params = RoundParams(
        context=context,
        clients=CLIENTS,
        neighbours=len(CLIENTS) - 1,
        threshold=THRESHOLD,
        bits=BITS,
        bound=CLIP,
        length=length,
    )
    enc = params.encoding
    section = SecAggTask(
        neighbours=sorted(set(CLIENTS) - {AGENT}),
        threshold=THRESHOLD,
        clients=len(CLIENTS),
        bits=BITS,
        clip_norm=CLIP,
        length=length,
    )
    vectors: dict[str, Vector] = {}
    with _fixed_randomness():
        clients = {c: _client(c, params) for c in CLIENTS}
        server = SecAggServer(params)
        for c in clients.values():
            server.add_keys(c.advertise())
        rosters = server.rosters()
        sealed = {name: c.share(rosters[name]) for name, c in clients.items()}
        for name, shares in sealed.items():
            server.add_shares(name, shares)
        deliveries = server.deliveries()
        clipped = {n: clip_vector(np.array(v), CLIP) for n, v in INPUTS.items()}
        masked = {n: c.mask(clipped[n], deliveries[n]) for n, c in clients.items()}
        for m in masked.values():
            server.add_input(m)
        request = server.unmask_request()
        replies = {n: c.unmask(request) for n, c in clients.items()}
    for reply in replies.values():
        server.add_unmasking(reply)
    total = server.result()

    base = {"agent_id": AGENT, "round_id": ROUND, "prototype": PROTOTYPE}
    mine = clients[AGENT]
    blob = masked[AGENT].masked.astype(enc.dtype.newbyteorder("<")).tobytes()
    task_secure = task.model_copy(
        update={**stamp("task-secagg"), "compression": SECURE_COMPRESSION, "secagg": section}
    )
    vectors["task-secagg"] = signed_vector(task_secure, TOPICS.down(AGENT, Down.TASK), COORDINATOR)
    vectors["secagg-keys"] = signed_vector(
        SecAggKeys(
            **stamp("secagg-keys", 1),
            **base,
            channel_key=mine._channel.public.hex(),
            mask_key=mine._mask.public.hex(),
        ),
        TOPICS.up(AGENT, Up.SECAGG_KEYS),
        AGENT_SIDE,
    )
    vectors["secagg-roster"] = signed_vector(
        SecAggRoster(
            **stamp("secagg-roster", 2),
            **base,
            keys={
                n: PublicKeys(channel_key=ch.hex(), mask_key=mk.hex())
                for n, (ch, mk) in sorted(rosters[AGENT].items())
            },
        ),
        TOPICS.down(AGENT, Down.SECAGG_ROSTER),
        COORDINATOR,
    )
    vectors["secagg-shares"] = signed_vector(
        SecAggShares(
            **stamp("secagg-shares", 3),
            **base,
            shares={s.receiver: s.sealed.hex() for s in sealed[AGENT]},
        ),
        TOPICS.up(AGENT, Up.SECAGG_SHARES),
        AGENT_SIDE,
    )
    vectors["secagg-delivery"] = signed_vector(
        SecAggDelivery(
            **stamp("secagg-delivery", 4),
            **base,
            shares={s.sender: s.sealed.hex() for s in deliveries[AGENT]},
        ),
        TOPICS.down(AGENT, Down.SECAGG_SHARES),
        COORDINATOR,
    )
    vectors["update-secagg"] = signed_vector(
        UpdateHeader(
            **stamp("update-secagg", 5),
            **base,
            base_digest=task.global_digest,
            blob=blob_ref(blob, CHUNK_SIZE),
            compression=SECURE_COMPRESSION,
            num_samples=NUM_SAMPLES,
            metrics={},
        ),
        TOPICS.up(AGENT, Up.UPDATE),
        AGENT_SIDE,
    )
    vectors["secagg-unmask"] = signed_vector(
        SecAggUnmask(
            **stamp("secagg-unmask", 6),
            **base,
            survivors=list(request.survivors),
            dropped=list(request.dropped),
            inputs=len(request.survivors),
        ),
        TOPICS.down(AGENT, Down.SECAGG_UNMASK),
        COORDINATOR,
    )
    reply = replies[AGENT]
    vectors["secagg-reveal"] = signed_vector(
        SecAggReveal(
            **stamp("secagg-reveal", 7),
            **base,
            seeds={
                o: RevealedShare(index=i, share=s.hex()) for o, (i, s) in reply.seed_shares.items()
            },
            keys={
                o: RevealedShare(index=i, share=s.hex()) for o, (i, s) in reply.key_shares.items()
            },
        ),
        TOPICS.up(AGENT, Up.SECAGG_REVEAL),
        AGENT_SIDE,
    )
    entry = {
        "context_hex": context.hex(),
        "context_text": f"takfl-secagg-1|{RUN}|{ROUND}|{PROTOTYPE}",
        "clients": list(CLIENTS),
        "threshold": THRESHOLD,
        "bits": BITS,
        "clip_norm": CLIP,
        "frac_bits": enc.frac_bits,
        "keys": {
            n: {
                "channel_private_hex": c._channel.private.hex(),
                "mask_private_hex": c._mask.private.hex(),
                "self_mask_seed_hex": c._seed.hex(),
            }
            for n, c in clients.items()
        },
        "inputs": INPUTS,
        "clipped": {n: v.tolist() for n, v in clipped.items()},
        "encoded_words": {n: enc.encode(v).tolist() for n, v in clipped.items()},
        "masked_words": {n: m.masked.tolist() for n, m in masked.items()},
        "masked_input_blob": "update-secagg.bin",
        "sum": total.tolist(),
        "unmask_request": {"survivors": list(request.survivors), "dropped": list(request.dropped)},
        "note": "S-000's messages are the message vectors secagg-*, task-secagg and "
        "update-secagg; every client of this round sends all four stages",
    }
    return vectors, {"update-secagg.bin": blob}, entry
