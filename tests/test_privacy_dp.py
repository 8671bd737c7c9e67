"""Central DP: clipping and noise on tiny tensors, the accountant against Opacus itself,
the budget, and the modes' refusals (FedET, per-update robust aggregation)."""

from __future__ import annotations

import math

import pytest
import torch

from coordinator.privacy import (
    PrivacyBudgetExceeded,
    build_privacy,
    planned_sample_rate,
    round_sample_rate,
    with_privacy,
)
from takfl.algorithms import resolve_algorithm
from takfl.config import load_federation
from takfl.privacy.accountant import PrivacyLedger, calibrate_noise, epsilon_of
from takfl.privacy.central import ClippedSum
from takfl.privacy.clipping import (
    clip,
    floating_delta,
    l2_norm,
    next_bound,
    sum_noise_multiplier,
)
from takfl.privacy.modes import PrivacyConfigError, resolve_privacy
from takfl.robust import make_aggregator


def _state(w: list[float], count: int = 3) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(w), "n": torch.tensor(count)}


# -- clipping ----------------------------------------------------------------------------------
def test_clip_bounds_the_norm_and_keeps_the_direction() -> None:
    delta = {
        "a": torch.tensor([3.0, 0.0], dtype=torch.float64),
        "b": torch.tensor([4.0], dtype=torch.float64),
    }

    clipped, norm = clip(delta, 1.0)

    assert norm == pytest.approx(5.0)
    assert l2_norm(clipped) == pytest.approx(1.0)
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0], dtype=torch.float64))
    assert torch.allclose(clipped["b"], torch.tensor([0.8], dtype=torch.float64))


def test_clip_leaves_a_delta_within_the_bound_alone() -> None:
    delta = {"a": torch.tensor([0.3, 0.4], dtype=torch.float64)}

    clipped, norm = clip(delta, 1.0)

    assert norm == pytest.approx(0.5)
    assert torch.equal(clipped["a"], delta["a"])


def test_floating_delta_skips_integer_entries() -> None:
    delta = floating_delta(_state([2.0, 1.0], 9), _state([1.0, 1.0], 3))

    assert set(delta) == {"w"}
    assert torch.equal(delta["w"], torch.tensor([1.0, 0.0], dtype=torch.float64))


# -- the clipped, noised sum -------------------------------------------------------------------
def test_clipped_sum_without_noise_is_the_mean_of_clipped_deltas_over_the_sampled() -> None:
    reference = _state([0.0, 0.0])
    acc = ClippedSum(
        reference, bound=1.0, denominator=3, noise_std=0.0, generator=torch.Generator()
    )

    acc.add(_state([10.0, 0.0], 50), weight=1000.0)  # clipped to (1, 0); weight ignored
    acc.add(_state([0.0, 0.5], 7), weight=1.0)  # within the bound
    out = acc.result()

    assert torch.allclose(out["w"], torch.tensor([1.0 / 3, 0.5 / 3]))  # 3 sampled, 2 answered
    assert int(out["n"]) == 3  # integer entries: the reference's
    assert acc.count == 2
    assert acc.unclipped == 1


def test_clipped_sum_noise_has_std_noise_std_over_the_denominator() -> None:
    reference = {"w": torch.zeros(20_000)}
    acc = ClippedSum(
        reference,
        bound=1.0,
        denominator=4,
        noise_std=2.0,
        generator=torch.Generator().manual_seed(0),
    )

    out = acc.result()

    assert float(out["w"].mean()) == pytest.approx(0.0, abs=0.02)
    assert float(out["w"].std()) == pytest.approx(0.5, rel=0.03)  # 2.0 / 4
    assert torch.equal(acc.result()["w"], out["w"])  # the noise is drawn once


def test_one_client_moves_the_release_by_at_most_bound_over_denominator() -> None:
    reference = _state([0.0, 0.0])
    without = ClippedSum(
        reference, bound=0.5, denominator=2, noise_std=0.0, generator=torch.Generator()
    )
    with_it = ClippedSum(
        reference, bound=0.5, denominator=2, noise_std=0.0, generator=torch.Generator()
    )
    without.add(_state([0.1, 0.2]))
    with_it.add(_state([0.1, 0.2]))

    with_it.add(_state([-1e6, 3e6]))  # any update at all

    moved = (with_it.result()["w"] - without.result()["w"]).norm()
    assert float(moved) <= 0.5 / 2 + 1e-9


# -- adaptive clipping (Andrew et al. 2021) ------------------------------------------------------
def test_sum_noise_multiplier_splits_the_round_as_theorem_1() -> None:
    z, sigma_b = 1.0, 2.0

    z_sum = sum_noise_multiplier(z, sigma_b)

    assert (z_sum**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)
    assert sum_noise_multiplier(z, None) == z
    with pytest.raises(ValueError, match="count noise"):
        sum_noise_multiplier(1.0, 0.4)


def test_next_bound_grows_when_too_many_are_clipped_and_shrinks_otherwise() -> None:
    assert next_bound(1.0, 0.1, 0.5, 0.2) == pytest.approx(math.exp(0.08))
    assert next_bound(1.0, 0.9, 0.5, 0.2) < 1.0
    assert next_bound(1.0, 0.5, 0.5, 0.2) == pytest.approx(1.0)


# -- the accountant is Opacus's ------------------------------------------------------------------
def test_rdp_ledger_epsilon_equals_opacus_rdp_analysis() -> None:
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    ledger = PrivacyLedger("rdp")
    for _ in range(10):
        ledger.record(1.1, 0.3)
    ledger.record(0.9, 1.0, rounds=2)

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=0.3, noise_multiplier=1.1, steps=10, orders=orders) + compute_rdp(
        q=1.0, noise_multiplier=0.9, steps=2, orders=orders
    )
    expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)

    assert ledger.history == [(1.1, 0.3, 10), (0.9, 1.0, 2)]
    assert ledger.epsilon(1e-5) == pytest.approx(float(expected), rel=1e-12)


def test_prv_ledger_epsilon_equals_opacus_prv_accountant() -> None:
    from opacus.accountants import PRVAccountant

    ledger = PrivacyLedger("prv", [(1.2, 0.4, 5)])
    acc = PRVAccountant()
    for _ in range(5):
        acc.step(noise_multiplier=1.2, sample_rate=0.4)

    assert ledger.epsilon(1e-5) == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)


def test_calibrated_noise_spends_at_most_the_target() -> None:
    z = calibrate_noise("rdp", 3.0, 1e-5, 0.3, 10)

    eps = epsilon_of("rdp", [(z, 0.3, 10)], 1e-5)

    assert 2.9 <= eps <= 3.0
    assert epsilon_of("rdp", [(z * 0.9, 0.3, 10)], 1e-5) > 3.0


def test_an_empty_ledger_has_spent_nothing() -> None:
    assert PrivacyLedger("rdp").epsilon(1e-5) == 0.0


# -- the run's budget ----------------------------------------------------------------------------
def _dp(epsilon: float = 3.0, **extra: object) -> object:
    cfg = load_federation("digits")
    return with_privacy(cfg, {"mode": "central-dp", "epsilon": epsilon, **extra})


def test_sample_rates() -> None:
    assert planned_sample_rate(10, 0.3) == pytest.approx(0.3)
    assert planned_sample_rate(5, 0.4) == pytest.approx(0.4)
    assert planned_sample_rate(7, 0.1) == pytest.approx(1 / 7)
    assert round_sample_rate(["a", "b"], ["a", "b", "c", "d"]) == 0.5
    assert round_sample_rate(["a"], []) == 1.0


def test_build_privacy_calibrates_each_prototype_to_the_budget() -> None:
    cfg = _dp(3.0)

    privacy = build_privacy(cfg, rounds=10)  # type: ignore[arg-type]

    for name, b in privacy.budgets.items():
        eps = b.ledger.epsilon_after(b.noise_multiplier, b.sample_rate, 10, 1e-5)
        assert 2.9 <= eps <= 3.0, name
    # q = 1 (every L client every round) needs more noise than q = 0.3
    assert privacy.budgets["L"].noise_multiplier > privacy.budgets["S"].noise_multiplier


def test_a_run_the_noise_cannot_last_is_refused_before_it_starts() -> None:
    cfg = _dp(1.0, noise_multiplier=0.8)

    with pytest.raises(PrivacyBudgetExceeded, match="over the budget 1"):
        build_privacy(cfg, rounds=10)  # type: ignore[arg-type]


def test_a_round_that_would_pass_the_budget_is_refused_before_its_tasks() -> None:
    privacy = build_privacy(_dp(3.0), rounds=2)  # type: ignore[arg-type]
    plan = {"S": ["S-000", "S-001", "S-002"], "M": ["M-000", "M-001"], "L": ["L-000", "L-001"]}
    available = {"S": [f"S-{i:03d}" for i in range(10)], "M": [f"M-{i:03d}" for i in range(5)]}
    for b in privacy.budgets.values():
        b.ledger.record(b.noise_multiplier, b.sample_rate, 2)  # the two planned rounds spent

    with pytest.raises(PrivacyBudgetExceeded, match="round 3 would bring prototype"):
        privacy.check_round(3, plan, available)


@pytest.mark.slow  # a real broker and seconds of waiting: the full suite runs it
def test_the_ledger_survives_a_restart() -> None:
    first = build_privacy(_dp(8.0), rounds=10)  # type: ignore[arg-type]
    for b in first.budgets.values():
        b.ledger.record(b.noise_multiplier, b.sample_rate, 3)
    first.budgets["S"].clip_norm = 0.7

    again = build_privacy(_dp(8.0), rounds=10)  # type: ignore[arg-type]
    again.load_state(first.to_state())

    assert again.epsilons() == pytest.approx(first.epsilons())
    assert again.budgets["S"].clip_norm == 0.7
    with pytest.raises(PrivacyBudgetExceeded, match="no central-dp ledger"):
        build_privacy(_dp(8.0), rounds=10).load_state(None)  # type: ignore[arg-type]


def test_adaptive_clipping_with_too_little_count_noise_is_refused() -> None:
    cfg = _dp(1.0, clipping="adaptive")  # digits samples 2-3 clients: sigma_b = 0.15

    with pytest.raises(ValueError, match="count noise"):
        build_privacy(cfg, rounds=10)  # type: ignore[arg-type]


def test_central_dp_needs_a_budget() -> None:
    with pytest.raises(ValueError, match=r"privacy\.epsilon"):
        with_privacy(load_federation("digits"), {"mode": "central-dp"})


# -- what central DP refuses ---------------------------------------------------------------------
def test_central_dp_refuses_fedet_with_a_clear_error() -> None:
    cfg = _dp()
    algo = resolve_algorithm(cfg.algorithm, "fedet")  # type: ignore[attr-defined]

    with pytest.raises(PrivacyConfigError) as err:
        resolve_privacy(cfg.privacy, algo, make_aggregator(cfg.aggregation))  # type: ignore[attr-defined]

    assert "fedet" in str(err.value)
    assert "every client's own logits" in str(err.value)
    assert "takfl-reg" in str(err.value)  # says what to use instead


@pytest.mark.parametrize("method", ["median", "trimmed-mean", "clipped-mean"])
def test_central_dp_refuses_per_update_robust_aggregation(method: str) -> None:
    cfg = load_federation("digits")
    cfg = cfg.model_copy(
        update={"aggregation": cfg.aggregation.model_copy(update={"method": method})}
    )
    cfg = with_privacy(cfg, {"mode": "central-dp", "epsilon": 3.0})
    algo = resolve_algorithm(cfg.algorithm, "takfl-reg")

    with pytest.raises(PrivacyConfigError, match=f"aggregation '{method}'.*fedavg"):
        resolve_privacy(cfg.privacy, algo, make_aggregator(cfg.aggregation))


@pytest.mark.parametrize("name", ["takfl-reg", "takfl", "feddf", "fedavg"])
def test_central_dp_runs_the_dp_correct_algorithms(name: str) -> None:
    cfg = _dp()
    algo = resolve_algorithm(cfg.algorithm, name)  # type: ignore[attr-defined]

    mode = resolve_privacy(cfg.privacy, algo, make_aggregator(cfg.aggregation))  # type: ignore[attr-defined]

    assert mode.teacher_from_aggregate


def test_plain_mode_allows_everything() -> None:
    cfg = load_federation("digits")
    cfg = cfg.model_copy(
        update={"aggregation": cfg.aggregation.model_copy(update={"method": "median"})}
    )
    algo = resolve_algorithm(cfg.algorithm, "fedet")

    assert not resolve_privacy(cfg.privacy, algo, make_aggregator(cfg.aggregation)).spends_budget


def test_a_noised_batchnorm_variance_stays_positive() -> None:
    reference = {"bn.running_var": torch.ones(5000), "bn.weight": torch.ones(5000)}
    acc = ClippedSum(
        reference,
        bound=1.0,
        denominator=1,
        noise_std=3.0,
        generator=torch.Generator().manual_seed(0),
    )

    out = acc.result()

    assert float(out["bn.running_var"].min()) >= 1e-2 - 1e-7  # float32 of 0.01
    assert float(out["bn.weight"].min()) < 0  # other entries keep their noise
