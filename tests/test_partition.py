"""The seeded partitioner, on the real digits labels: disjoint sets, every private sample
used once, ratios and minimums held, Dirichlet skew, determinism, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest

from takfl.data import (
    Partition,
    PartitionError,
    PrototypeShare,
    dirichlet_split,
    load_digits,
    make_partition,
    partition_summary,
    split_by_ratio,
)

PAPER_TIERS = [
    PrototypeShare("S", 0.1, 10),
    PrototypeShare("M", 0.3, 5),
    PrototypeShare("L", 0.6, 2),
]
SETS = {"test_size": 360, "validation_size": 100, "public_size": 400}


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return load_digits().y.numpy()


@pytest.fixture(scope="module")
def partition(labels: np.ndarray) -> Partition:
    return make_partition(labels, PAPER_TIERS, **SETS, alpha=0.3, min_per_client=4, seed=0)


def mean_max_class_fraction(labels: np.ndarray, clients: list[np.ndarray]) -> float:
    """1/num_classes for perfectly mixed clients, 1.0 when each holds one class."""
    return float(np.mean([np.bincount(labels[c]).max() / len(c) for c in clients]))


def same(a: Partition, b: Partition) -> bool:
    arrays_a = [a.test, a.validation, a.public, *[c for cs in a.private.values() for c in cs]]
    arrays_b = [b.test, b.validation, b.public, *[c for cs in b.private.values() for c in cs]]
    return len(arrays_a) == len(arrays_b) and all(
        np.array_equal(x, y) for x, y in zip(arrays_a, arrays_b, strict=True)
    )


def test_digits_labels_are_the_real_data_set(labels: np.ndarray) -> None:
    assert len(labels) == 1797
    assert set(np.unique(labels).tolist()) == set(range(10))


def test_sets_are_disjoint_and_cover_every_sample(labels: np.ndarray, partition: Partition) -> None:
    everything = partition.all_indices()

    assert len(everything) == len(labels)
    assert len(np.unique(everything)) == len(everything)  # nothing used twice
    assert np.array_equal(np.sort(everything), np.arange(len(labels)))  # nothing left out


def test_carved_sets_have_the_requested_sizes(partition: Partition) -> None:
    assert len(partition.test) == SETS["test_size"]
    assert len(partition.validation) == SETS["validation_size"]
    assert len(partition.public) == SETS["public_size"]


def test_private_shares_follow_the_ratios(labels: np.ndarray, partition: Partition) -> None:
    total = len(labels) - sum(SETS.values())
    sizes = partition.private_sizes()

    assert sum(sizes.values()) == total
    for proto in PAPER_TIERS:
        assert abs(sizes[proto.name] - proto.ratio * total) <= 1


def test_every_client_exists_and_has_the_minimum(partition: Partition) -> None:
    for proto in PAPER_TIERS:
        clients = partition.private[proto.name]
        assert len(clients) == proto.clients
        assert min(len(c) for c in clients) >= 4


def test_client_index_arrays_are_sorted_int64(partition: Partition) -> None:
    for clients in partition.private.values():
        for c in clients:
            assert c.dtype == np.int64
            assert np.all(np.diff(c) > 0)


def test_small_alpha_skews_client_labels(labels: np.ndarray) -> None:
    def skew(alpha: float) -> float:
        part = make_partition(
            labels,
            [PrototypeShare("A", 1.0, 20)],
            test_size=0,
            validation_size=0,
            public_size=0,
            alpha=alpha,
            min_per_client=2,
            seed=4,
        )
        return mean_max_class_fraction(labels, part.private["A"])

    skewed, mixed = skew(0.1), skew(100.0)

    assert mixed < 0.2  # near the 0.1 of perfectly mixed clients
    assert skewed > 0.45  # most of a client's data is one class
    assert skewed > mixed + 0.3


def test_same_seed_same_partition_other_seed_another(labels: np.ndarray) -> None:
    def run(seed: int) -> Partition:
        return make_partition(labels, PAPER_TIERS, **SETS, alpha=0.3, min_per_client=4, seed=seed)

    assert same(run(7), run(7))
    assert not same(run(7), run(8))
    assert not np.array_equal(run(7).test, run(8).test)


def test_zero_sized_carved_sets_leave_everything_private(labels: np.ndarray) -> None:
    part = make_partition(
        labels, PAPER_TIERS, test_size=0, validation_size=0, public_size=0, alpha=1.0
    )

    assert len(part.test) == len(part.validation) == len(part.public) == 0
    assert sum(part.private_sizes().values()) == len(labels)


def test_one_client_gets_the_whole_share(labels: np.ndarray) -> None:
    share = np.arange(100, 300)
    rng = np.random.default_rng(0)

    (only,) = dirichlet_split(labels, share, 1, 0.3, 5, rng)

    assert np.array_equal(only, share)


def test_minimum_holds_even_when_redraws_run_out(labels: np.ndarray) -> None:
    """With a tiny alpha and one try, short clients are topped up from the largest."""
    share = np.arange(0, 400)
    rng = np.random.default_rng(1)

    clients = dirichlet_split(labels, share, 10, 0.01, 30, rng, max_tries=1)

    assert min(len(c) for c in clients) >= 30
    joined = np.concatenate(clients)
    assert np.array_equal(np.sort(joined), share)


@pytest.mark.parametrize(
    ("total", "ratios"),
    [(1000, [0.1, 0.3, 0.6]), (7, [1, 1, 1]), (1, [0.5, 0.5]), (0, [1, 2]), (101, [3, 0, 7])],
)
def test_split_by_ratio_sums_and_rounds_within_one(total: int, ratios: list[float]) -> None:
    sizes = split_by_ratio(total, ratios)

    assert sum(sizes) == total
    weights = np.asarray(ratios, dtype=float) / sum(ratios)
    assert all(abs(s - total * w) < 1 for s, w in zip(sizes, weights, strict=True))


def test_split_by_ratio_on_many_random_requests() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        total = int(rng.integers(0, 5000))
        ratios = rng.random(int(rng.integers(1, 8))) + 1e-3
        sizes = split_by_ratio(total, ratios.tolist())
        assert sum(sizes) == total
        assert np.all(np.abs(np.asarray(sizes) - total * ratios / ratios.sum()) < 1)


def test_summary_rows_count_every_sample(labels: np.ndarray, partition: Partition) -> None:
    rows = partition_summary(partition, labels, 10)

    assert len(rows) == 3 + sum(p.clients for p in PAPER_TIERS)
    assert [r[0] for r in rows[:4]] == ["test", "validation", "public", "S/client-0"]
    for row in rows:
        assert len(row) == 12
        assert int(row[1]) == sum(int(c) for c in row[2:])
    assert sum(int(r[1]) for r in rows) == len(labels)


IMPOSSIBLE = [
    pytest.param(
        {"test_size": 900, "validation_size": 500, "public_size": 400},
        "leaves nothing private",
        id="carved-too-much",
    ),
    pytest.param({"test_size": -1}, "must not be negative", id="negative-size"),
    pytest.param({"alpha": 0.0}, "alpha must be positive", id="zero-alpha"),
    pytest.param(
        {"prototypes": [PrototypeShare("S", 0.5, 2), PrototypeShare("S", 0.5, 2)]},
        "must be unique",
        id="duplicate-names",
    ),
    pytest.param(
        {"prototypes": [PrototypeShare("S", 0.01, 50), PrototypeShare("L", 0.99, 2)]},
        "prototype 'S' (ratio 0.01): 9 samples cannot give 50 clients 4 each",
        id="too-many-clients-for-the-share",
    ),
    pytest.param(
        {"prototypes": [PrototypeShare("S", 1.0, 0)]},
        "at least one client",
        id="no-clients",
    ),
    pytest.param({"prototypes": []}, "not all zero", id="no-prototypes"),
    pytest.param(
        {"prototypes": [PrototypeShare("S", -0.5, 2), PrototypeShare("L", 1.5, 2)]},
        "non-negative",
        id="negative-ratio",
    ),
]


@pytest.mark.parametrize(("overrides", "fragment"), IMPOSSIBLE)
def test_impossible_requests_say_what_to_change(
    labels: np.ndarray, overrides: dict[str, object], fragment: str
) -> None:
    request: dict[str, object] = {
        "prototypes": PAPER_TIERS,
        **SETS,
        "alpha": 0.3,
        "min_per_client": 4,
    }
    request.update(overrides)

    with pytest.raises(PartitionError) as exc:
        make_partition(labels, **request)  # type: ignore[arg-type]

    assert fragment in str(exc.value)


def test_too_small_share_suggests_a_fix(labels: np.ndarray) -> None:
    with pytest.raises(PartitionError, match="lower min_per_client or the client count"):
        dirichlet_split(labels, np.arange(10), 5, 0.3, 3, np.random.default_rng(0))
