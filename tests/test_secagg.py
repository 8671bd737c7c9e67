"""Secure aggregation maths, broker-free: Shamir on long secrets, sealed shares, the
fixed-point range, and SecAgg+ rounds in process: the sum is exact up to fixed point
with and without dropouts up to the threshold, the round fails with its reason beyond
it, and the server never holds an individual unmasked update."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import pytest

from takfl.secagg.client import SecAggClient, clip_vector
from takfl.secagg.crypto import (
    CHANNEL_INFO,
    MASK_INFO,
    SecAggCryptoError,
    agree,
    combine_secret,
    expand_mask,
    new_key_pair,
    open_sealed,
    seal,
    split_secret,
)
from takfl.secagg.fixedpoint import RangeError, fixed_point_for
from takfl.secagg.inprocess import Dropouts, run_round
from takfl.secagg.messages import Failure, RoundParams, SecAggFailure, UnmaskRequest
from takfl.secagg.server import SecAggServer

LENGTH = 300


def _params(n: int, threshold: int, neighbours: int | None = None) -> RoundParams:
    return RoundParams(
        context=b"run-1|round-3|S",
        clients=tuple(f"agent-{i:03d}" for i in range(n)),
        neighbours=n - 1 if neighbours is None else neighbours,
        threshold=threshold,
        bound=1.0,
        length=LENGTH,
    )


def _updates(params: RoundParams, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: clip_vector(rng.normal(size=params.length), params.bound) for c in params.clients}


def _true_sum(updates: dict[str, np.ndarray], without: frozenset[str] = frozenset()) -> np.ndarray:
    return np.sum([v for c, v in updates.items() if c not in without], axis=0)


# -- primitives --------------------------------------------------------------------------------
def test_shamir_recovers_a_32_byte_secret_from_any_t_shares_only() -> None:
    secret = os.urandom(32)
    shares = split_secret(secret, 3, 6)

    assert combine_secret(shares[:3], 3) == secret
    assert combine_secret([shares[5], shares[1], shares[3]], 3) == secret
    with pytest.raises(SecAggCryptoError, match="2 share"):
        combine_secret(shares[:2], 3)


def test_key_agreement_is_symmetric_and_separates_uses() -> None:
    a, b = new_key_pair(), new_key_pair()

    ab = agree(a.private, b.public, MASK_INFO, b"ctx")

    assert ab == agree(b.private, a.public, MASK_INFO, b"ctx")
    assert ab != agree(a.private, b.public, CHANNEL_INFO, b"ctx")
    assert ab != agree(a.private, b.public, MASK_INFO, b"other round")


def test_a_sealed_share_opens_only_with_its_key_and_label() -> None:
    key = os.urandom(32)
    sealed = seal(key, b"share", b"a|b")

    assert open_sealed(key, sealed, b"a|b") == b"share"
    with pytest.raises(SecAggCryptoError):
        open_sealed(key, sealed, b"a|c")
    with pytest.raises(SecAggCryptoError):
        open_sealed(os.urandom(32), sealed, b"a|b")


def test_masks_are_deterministic_words_of_the_group() -> None:
    seed = os.urandom(32)

    mask = expand_mask(seed, 10, np.dtype(np.uint32))

    assert mask.dtype == np.uint32 and mask.shape == (10,)
    assert np.array_equal(mask, expand_mask(seed, 10, np.dtype(np.uint32)))


# -- fixed point -------------------------------------------------------------------------------
@pytest.mark.parametrize(("bits", "clients"), [(32, 10), (32, 200), (64, 200)])
def test_the_sum_of_clients_at_the_bound_never_wraps(bits: int, clients: int) -> None:
    enc = fixed_point_for(bits, 2.5, clients)
    extreme = np.array([2.5, -2.5, 2.5 - 1e-9])

    total = np.zeros(3, dtype=enc.dtype)
    for _ in range(clients):
        total = total + enc.encode(extreme)

    assert np.allclose(enc.decode(total), clients * extreme, atol=enc.max_error(clients))
    assert clients * (2.5 * enc.scale + 0.5) < 2 ** (bits - 1)


def test_an_unclipped_value_is_refused() -> None:
    enc = fixed_point_for(32, 1.0, 10)

    with pytest.raises(RangeError, match="clip"):
        enc.encode(np.array([1.5]))
    with pytest.raises(RangeError, match="NaN"):
        enc.encode(np.array([np.nan]))


def test_too_many_clients_for_32_bits_are_refused() -> None:
    with pytest.raises(RangeError, match="64 bits"):
        fixed_point_for(32, 1e9, 10)


# -- whole rounds ------------------------------------------------------------------------------
def test_the_sum_is_exact_up_to_fixed_point_without_dropouts() -> None:
    params = _params(8, threshold=5)
    updates = _updates(params)

    total, _ = run_round(params, updates)

    error = np.abs(total - _true_sum(updates)).max()
    assert error <= params.encoding.max_error(8)


@pytest.mark.parametrize("stage", ["before_shares", "before_input"])
def test_the_sum_of_the_others_survives_n_minus_t_dropouts(stage: str) -> None:
    params = _params(8, threshold=5)
    updates = _updates(params, seed=1)
    gone = frozenset(params.clients[1:4])  # 3 = n - t

    total, _ = run_round(params, updates, Dropouts(**{stage: gone}))

    assert np.abs(total - _true_sum(updates, gone)).max() <= params.encoding.max_error(8)


def test_dropouts_during_unmasking_are_tolerated_while_t_answer() -> None:
    params = _params(8, threshold=5)
    updates = _updates(params, seed=2)
    gone = frozenset(params.clients[:2])

    total, _ = run_round(
        params,
        updates,
        Dropouts(before_input=gone, before_unmasking=frozenset(params.clients[2:3])),
    )

    assert np.abs(total - _true_sum(updates, gone)).max() <= params.encoding.max_error(8)


def test_secagg_plus_with_a_sparse_graph() -> None:
    params = _params(20, threshold=4, neighbours=6)
    updates = _updates(params, seed=3)
    gone = frozenset({params.clients[3], params.clients[11]})

    total, trace = run_round(params, updates, Dropouts(before_input=gone))

    assert np.abs(total - _true_sum(updates, gone)).max() <= params.encoding.max_error(20)
    assert all(len(params.neighbours_of(c)) == 6 for c in params.clients)
    assert trace.upload["shares"] < 20 * 19 * 100  # shares go to 6 neighbours, not 19


@pytest.mark.parametrize(
    ("drop", "reason"),
    [
        (
            Dropouts(before_keys=frozenset({"agent-000", "agent-001", "agent-002", "agent-003"})),
            Failure.TOO_FEW_KEYS,
        ),
        (
            Dropouts(before_shares=frozenset({"agent-000", "agent-001", "agent-002", "agent-003"})),
            Failure.TOO_FEW_SHARES,
        ),
        (
            Dropouts(before_input=frozenset({"agent-000", "agent-001", "agent-002", "agent-003"})),
            Failure.TOO_FEW_INPUTS,
        ),
        (
            Dropouts(
                before_input=frozenset({"agent-000", "agent-001"}),
                before_unmasking=frozenset({"agent-002", "agent-003"}),
            ),
            Failure.TOO_FEW_UNMASKING,
        ),
    ],
)
def test_past_the_threshold_the_round_fails_with_its_reason(
    drop: Dropouts, reason: Failure
) -> None:
    params = _params(8, threshold=5)

    with pytest.raises(SecAggFailure) as err:
        run_round(params, _updates(params), drop)

    assert err.value.reason is reason


def test_a_client_never_reveals_seed_and_key_of_one_neighbour() -> None:
    params = _params(4, threshold=3)
    clients = {c: SecAggClient(c, params) for c in params.clients}
    server = SecAggServer(params)
    for c in clients.values():
        server.add_keys(c.advertise())
    rosters = server.rosters()
    for name, c in clients.items():
        server.add_shares(name, c.share(rosters[name]))
    deliveries = server.deliveries()
    updates = _updates(params)
    me = params.clients[0]
    clients[me].mask(updates[me], deliveries[me])

    with pytest.raises(SecAggFailure, match="survivor and as dropped"):
        clients[me].unmask(UnmaskRequest(params.clients[:3], params.clients[2:]))


def test_stages_run_in_order_only() -> None:
    params = _params(4, threshold=3)
    client = SecAggClient(params.clients[0], params)

    with pytest.raises(SecAggFailure, match="expected stage"):
        client.mask(np.zeros(LENGTH), [])


# -- the server holds no individual update -----------------------------------------------------
def _arrays(obj: Any, seen: set[int] | None = None) -> list[np.ndarray]:
    """Every numpy array reachable from ``obj`` (attributes, containers, dataclasses)."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        return [a for k, v in obj.items() for a in _arrays(k, seen) + _arrays(v, seen)]
    if isinstance(obj, list | tuple | set | frozenset):
        return [a for v in obj for a in _arrays(v, seen)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [a for f in dataclasses.fields(obj) for a in _arrays(getattr(obj, f.name), seen)]
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return _arrays(vars(obj), seen)
    return []


def _holds(arrays: list[np.ndarray], update: np.ndarray, encoded: np.ndarray) -> bool:
    for a in arrays:
        if a.shape != update.shape:
            continue
        if np.array_equal(a, encoded):
            return True
        if a.dtype.kind == "f" and np.allclose(a, update, atol=1e-6):
            return True
    return False


def test_the_server_never_holds_an_individual_update() -> None:
    params = _params(6, threshold=4)
    updates = _updates(params, seed=4)
    enc = params.encoding
    encoded = {c: enc.encode(u) for c, u in updates.items()}
    clients = {c: SecAggClient(c, params) for c in params.clients}
    server = SecAggServer(params)
    snapshots: list[list[np.ndarray]] = []

    for c in clients.values():
        server.add_keys(c.advertise())
    rosters = server.rosters()
    for name, c in clients.items():
        server.add_shares(name, c.share(rosters[name]))
    deliveries = server.deliveries()
    for name in params.clients[1:]:  # agent-000 drops out before its input
        server.add_input(clients[name].mask(updates[name], deliveries[name]))
        snapshots.append(_arrays(server))
    request = server.unmask_request()
    for name in request.survivors:
        server.add_unmasking(clients[name].unmask(request))
    snapshots.append(_arrays(server))
    total = server.result()
    snapshots.append(_arrays(server))

    survivors = frozenset(params.clients[1:])
    assert np.abs(total - _true_sum(updates, frozenset(params.clients[:1]))).max() < 1e-6
    for arrays in snapshots:
        for name in survivors:
            assert not _holds(arrays, updates[name], encoded[name]), name


# -- what is checked of the sum ----------------------------------------------------------------
def test_an_honest_sum_passes_the_norm_check_and_an_unclipped_client_fails_it() -> None:
    from takfl.secagg.checks import sum_problem

    params = _params(6, threshold=4)
    updates = _updates(params, seed=5)
    updates[params.clients[0]] = np.zeros(params.length)
    updates[params.clients[0]][0] = 10.0  # a client that skipped clipping (10 C)
    enc = params.encoding
    honest = np.sum([enc.decode(enc.encode(u)) for u in list(updates.values())[1:]], axis=0)
    total = honest + updates[params.clients[0]]  # what the masked sum would decode to

    assert sum_problem(honest, 5, 1.0) is None
    assert sum_problem(total, 6, 1.0) is not None
    assert sum_problem(np.array([np.nan]), 6, 1.0) == "the sum holds NaN or inf"
