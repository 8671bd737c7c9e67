"""Seeded partitioning as in the TAKFL paper.

The pool is split into disjoint test, labelled validation, unlabelled public
and private parts; private data is divided across prototypes by ratio
(e.g. 1:3:6), then across each prototype's clients by Dirichlet(alpha)
over class proportions, with a minimum number of samples per client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class PartitionError(ValueError):
    """The requested partition cannot be made from the data given."""


@dataclass(frozen=True)
class PrototypeShare:
    name: str
    ratio: float  # fraction of the private pool
    clients: int


@dataclass(kw_only=True)
class Partition:
    """Index arrays into the pool. ``private[name][k]`` are client k's samples."""

    test: np.ndarray
    validation: np.ndarray
    public: np.ndarray
    private: dict[str, list[np.ndarray]]

    def private_sizes(self) -> dict[str, int]:
        return {name: int(sum(len(c) for c in clients)) for name, clients in self.private.items()}

    def all_indices(self) -> np.ndarray:
        parts = [self.test, self.validation, self.public]
        parts += [c for clients in self.private.values() for c in clients]
        return np.concatenate(parts)


def split_by_ratio(total: int, ratios: Sequence[float]) -> list[int]:
    """Integer sizes summing to ``total``, each within one of ``total * ratio``
    (largest-remainder rounding)."""
    r = np.asarray(ratios, dtype=np.float64)
    if np.any(r < 0) or r.sum() <= 0:
        raise PartitionError(f"ratios must be non-negative and not all zero, got {list(ratios)}")
    exact = total * r / r.sum()
    sizes = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - sizes), kind="stable")[: total - int(sizes.sum())]:
        sizes[i] += 1
    return sizes.tolist()


def dirichlet_split(
    labels: np.ndarray,
    indices: np.ndarray,
    clients: int,
    alpha: float,
    min_per_client: int,
    rng: np.random.Generator,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Divide ``indices`` among ``clients``: for each class, proportions ~ Dirichlet(alpha).

    Redraws until every client has ``min_per_client`` samples; after ``max_tries``
    the largest clients give samples to the short ones, so the minimum always holds.
    """
    if clients < 1:
        raise PartitionError(f"a prototype needs at least one client, got {clients}")
    if clients * min_per_client > len(indices):
        raise PartitionError(
            f"{len(indices)} samples cannot give {clients} clients {min_per_client} each; "
            "lower min_per_client or the client count, or give this prototype a larger ratio"
        )
    if clients == 1:
        return [np.sort(indices)]
    pool_labels = labels[indices]
    best: list[list[int]] = []
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(clients)]
        for cls in np.unique(pool_labels):
            members = rng.permutation(indices[pool_labels == cls])
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(members)).astype(int)
            for k, part in enumerate(np.split(members, cuts[:-1])):
                shards[k].extend(part.tolist())
        best = shards
        if min(len(s) for s in shards) >= min_per_client:
            break
    else:
        order = sorted(range(clients), key=lambda k: len(best[k]))
        for k in order:
            while len(best[k]) < min_per_client:
                donor = max(range(clients), key=lambda j: len(best[j]))
                best[k].append(best[donor].pop(int(rng.integers(len(best[donor])))))
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in best]


def make_partition(
    labels: np.ndarray,
    prototypes: Sequence[PrototypeShare],
    *,
    test_size: int,
    validation_size: int,
    public_size: int,
    alpha: float,
    min_per_client: int = 2,
    seed: int = 0,
) -> Partition:
    """Partition a pool of ``len(labels)`` samples.

    Args:
        labels: (N,) integer class of every pool sample.
        prototypes: name, private-data ratio and client count of each prototype.
        test_size, validation_size, public_size: samples carved out first (0 when
            that set comes from elsewhere, e.g. CIFAR's own test split).
        alpha: Dirichlet concentration; small values give skewed client label mixes.
    Returns:
        disjoint index arrays; every remaining sample is private to exactly one client.
    """
    n = len(labels)
    carved = test_size + validation_size + public_size
    if min(test_size, validation_size, public_size) < 0:
        raise PartitionError("set sizes must not be negative")
    if carved >= n:
        raise PartitionError(f"test+validation+public = {carved} leaves nothing private of {n}")
    if alpha <= 0:
        raise PartitionError(f"alpha must be positive, got {alpha}")
    names = [p.name for p in prototypes]
    if len(set(names)) != len(names):
        raise PartitionError(f"prototype names must be unique, got {names}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    test = np.sort(order[:test_size])
    validation = np.sort(order[test_size : test_size + validation_size])
    public = np.sort(order[test_size + validation_size : carved])
    private_pool = order[carved:]
    sizes = split_by_ratio(len(private_pool), [p.ratio for p in prototypes])
    private: dict[str, list[np.ndarray]] = {}
    start = 0
    for proto, size in zip(prototypes, sizes, strict=True):
        share = private_pool[start : start + size]
        start += size
        try:
            private[proto.name] = dirichlet_split(
                labels, share, proto.clients, alpha, min_per_client, rng
            )
        except PartitionError as e:
            raise PartitionError(f"prototype {proto.name!r} (ratio {proto.ratio:g}): {e}") from e
    return Partition(test=test, validation=validation, public=public, private=private)


def partition_summary(part: Partition, labels: np.ndarray, num_classes: int) -> list[list[str]]:
    """Rows of a printable table: set/client, total, then samples per class."""
    rows: list[list[str]] = []

    def row(name: str, idx: np.ndarray) -> None:
        counts = np.bincount(labels[idx], minlength=num_classes)
        rows.append([name, str(len(idx)), *[str(int(c)) for c in counts]])

    row("test", part.test)
    row("validation", part.validation)
    row("public", part.public)
    for proto, clients in part.private.items():
        for k, idx in enumerate(clients):
            row(f"{proto}/client-{k}", idx)
    return rows
