"""The distillation budget: passes as a unit, the adaptive rule (early stopping within a
cap), its record in the step's info, the batched path under it, the held-out samples
without validation, and the budget of a config that names none."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from takfl.algorithms import resolve_algorithm
from takfl.budget import distill_settings, plan_budget, steps_info
from takfl.config import AlgorithmSpec
from takfl.config.federation import DEFAULT_DISTILL_PASSES, DistillSpec
from takfl.distill import (
    DistillSettings,
    batch_indices,
    device_batches,
    run_distillation,
    takfl_objective,
    takfl_objective_stacked,
)
from takfl.distill_batched import run_distillations_batched
from takfl.models import build_model
from takfl.server import PrototypeInput, StepData, server_step
from takfl.stopping import EarlyStopping, Tracker, agreement

SHAPE = (1, 8, 8)
N, K, V = 40, 10, 24
TOL = {"rtol": 1e-4, "atol": 1e-5}


def student(builder: str = "mlp_digits") -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    args = {"width": 8} if builder == "mlp_digits" else {}
    model = build_model(builder, K, SHAPE, **args)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def teachers(m: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(N, K, generator=g) * 3 for _ in range(m)]


def start_labels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).argmax(1)


# -- passes and pools ------------------------------------------------------------------
def test_passes_count_whole_and_fractional_passes() -> None:
    s = DistillSettings(passes=2.5, batch_size=16)
    assert s.total_steps(40) == math.ceil(2.5 * 3) == 8
    assert DistillSettings(passes=0.01, batch_size=16).total_steps(40) == 1
    batches = list(batch_indices(40, s, seed=0))
    assert len(batches) == 8
    first_two_passes = torch.cat(batches[:6]).tolist()
    assert sorted(first_two_passes) == sorted(list(range(40)) * 2)  # each sample once a pass


def test_one_budget_unit_wins() -> None:
    assert DistillSettings(steps=5, epochs=2, passes=1.0, batch_size=16).total_steps(40) == 6
    assert DistillSettings(steps=5, passes=1.0, batch_size=16).total_steps(40) == 3
    assert len(list(batch_indices(40, DistillSettings(steps=5, epochs=2, batch_size=16), 0))) == 6


def test_a_pool_restricts_the_samples_drawn() -> None:
    pool = torch.tensor([3, 7, 11, 19, 23, 31])
    drawn = device_batches(
        40, DistillSettings(passes=3, batch_size=4), 0, torch.device("cpu"), pool
    )
    seen = torch.cat(drawn)
    assert set(seen.tolist()) == set(pool.tolist())
    assert len(drawn) == 3 * 2


def test_a_config_that_names_no_budget_gets_the_default_passes() -> None:
    assert distill_settings(DistillSpec()).passes == DEFAULT_DISTILL_PASSES
    assert distill_settings(DistillSpec(passes=2)).total_steps(400) == 14
    # a config's steps or epochs override its passes (so does a test that shortens one)
    assert distill_settings(DistillSpec(steps=7, passes=2)).total_steps(400) == 7
    assert distill_settings(DistillSpec(steps=7, epochs=1)).total_steps(400) == 7
    assert DistillSpec().adaptive is True


# -- the rule --------------------------------------------------------------------------
def test_tracker_stops_after_patience_and_reports_improvements() -> None:
    t = Tracker(copies=2, patience=4)
    assert t.observe(0, [0.5, 0.5]) == [0, 1]
    assert t.observe(2, [0.6, 0.5]) == [0]
    assert t.observe(4, [0.6, 0.5]) == []
    assert t.stopped == [None, 4]  # copy 1: 4 steps since its best at step 0
    assert t.observe(6, [0.6, 0.9]) == []  # a stopped copy is no longer scored
    assert t.stopped == [6, 4] and t.done
    assert t.best_step == [2, 0] and t.best == [0.6, 0.5]
    assert t.steps_trained(0, 10) == 6 and t.steps_trained(1, 10) == 4


def test_ties_keep_the_later_checkpoint_only_when_asked() -> None:
    strict, ties = Tracker(copies=1, patience=2), Tracker(copies=1, patience=2, ties_improve=True)
    for t in (strict, ties):
        assert t.observe(0, [0.5]) == [0]
    assert strict.observe(2, [0.5]) == [] and strict.stopped == [2]  # FedDF's rule
    assert ties.observe(2, [0.5]) == [0] and ties.best_step == [2]  # a plateau goes on
    assert ties.observe(4, [0.4]) == [] and ties.stopped == [4]


def test_agreement_per_copy() -> None:
    logits = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])  # (2, 2, 2)
    assert agreement(logits, torch.tensor([0, 1])).tolist() == [1.0, 0.5]
    assert agreement(logits, torch.tensor([[0, 0], [1, 1]])).tolist() == [0.5, 1.0]


def test_early_stopping_refuses_mismatched_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        EarlyStopping(x=torch.zeros(5, 2), labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(x=torch.zeros(5, 2), labels=torch.zeros(5, dtype=torch.long), patience=0)


def test_a_distillation_that_stops_improving_stops_before_its_cap() -> None:
    model, start = student()
    x, val = inputs(N, 2), inputs(V, 3)
    y = start_labels(model, val)  # the start is perfect on validation: nothing can beat it
    wrong = torch.nn.functional.one_hot((start_labels(model, x) + 1) % K, K).float() * 10
    stop = EarlyStopping(x=val, labels=y, every=2, patience=6)
    run = run_distillation(
        model,
        start,
        x,
        takfl_objective(wrong, None, 1.0),
        DistillSettings(steps=100, batch_size=8, learning_rate=5e-2),
        seed=0,
        early_stopping=stop,
    )
    assert run.steps == 6 < 100  # stopped after its patience
    assert run.best_step == 0
    assert [s for s, _ in run.scores] == [0, 2, 4, 6]
    for k, v in start.items():
        assert torch.equal(run.state[k], v)  # nothing beat the start: it is kept


def test_an_improving_distillation_runs_to_its_cap_and_keeps_its_best() -> None:
    model, start = student()
    x = inputs(N, 2)
    z = teachers(1)[0]
    stop = EarlyStopping(x=x, labels=z.argmax(1), every=3, patience=10**6)
    settings = DistillSettings(steps=10, batch_size=8, learning_rate=5e-2)
    run = run_distillation(
        model, start, x, takfl_objective(z, None, 3.0), settings, seed=0, early_stopping=stop
    )
    assert run.steps == 10  # the cap
    assert [s for s, _ in run.scores] == [0, 3, 6, 9, 10]  # a last score at the cap
    best = max(run.scores, key=lambda p: p[1])
    assert run.best_step == min(s for s, v in run.scores if v == best[1])
    assert run.scores[-1][1] > run.scores[0][1]  # it learned to agree with its teacher


def test_batched_early_stopping_equals_sequential() -> None:
    """Copies stop at different steps; each keeps what it would have kept alone."""
    model, start = student("cnn_digits_small")
    x = inputs(N, 2)
    targets = teachers(3)
    # copy 0 scored against labels it already has (stops at once), the others against
    # their own teacher on the public set (they improve, then plateau at their own pace)
    labels = torch.stack([start_labels(model, x), targets[1].argmax(1), targets[2].argmax(1)])
    stop = EarlyStopping(x=x, labels=labels, every=2, patience=4)
    settings = DistillSettings(steps=24, batch_size=8, learning_rate=2e-2)
    self_logits = torch.randn(N, K)
    seq = [
        run_distillation(
            model,
            start,
            x,
            takfl_objective(z, self_logits, 3.0, 0.5, 20.0),
            settings,
            seed=7,
            early_stopping=EarlyStopping(x=x, labels=labels[i], every=2, patience=4),
        )
        for i, z in enumerate(targets)
    ]
    objective = takfl_objective_stacked(torch.stack(targets), self_logits, 3.0, 0.5, 20.0)
    bat = run_distillations_batched(
        model, start, x, objective, 3, settings, seed=7, early_stopping=stop
    )
    assert [r.steps for r in bat] == [r.steps for r in seq]
    assert [r.best_step for r in bat] == [r.best_step for r in seq]
    assert seq[0].steps == 4 and seq[0].best_step == 0
    assert len({r.steps for r in seq}) > 1  # they did stop at different steps
    for s, b in zip(seq, bat, strict=True):
        assert s.state.keys() == b.state.keys()
        for k in s.state:
            if s.state[k].is_floating_point():
                torch.testing.assert_close(s.state[k], b.state[k], **TOL, msg=k)
            else:
                assert torch.equal(s.state[k], b.state[k]), k
        assert [p for p, _ in s.scores] == [p for p, _ in b.scores]


# -- the server step -------------------------------------------------------------------
def tiny_round() -> tuple[list[PrototypeInput], StepData]:
    torch.manual_seed(0)
    protos = []
    for i, name in enumerate("SML"):
        model = build_model("mlp_digits", K, SHAPE, width=4 + 4 * i)
        logits = [torch.randn(N, K) * 3 for _ in range(2)]
        protos.append(
            PrototypeInput(
                name=name,
                model=model,
                avg_state={k: v.clone() for k, v in model.state_dict().items()},
                mean_logits=torch.stack(logits).mean(0),
                num_clients=2,
                client_logits=logits,
            )
        )
    g = torch.Generator().manual_seed(4)
    data = StepData(inputs(N, 5), inputs(V, 6), torch.randint(0, K, (V,), generator=g))
    return protos, data


def spec(**distill: object) -> AlgorithmSpec:
    d: dict[str, object] = {"passes": 2, "batch_size": 8, "learning_rate": 1e-2}
    d.update(distill)
    return AlgorithmSpec.model_validate(
        {"distill": d, "lambdas": {"search_candidates": 4, "learn_steps": 2}}
    )


@pytest.mark.parametrize("name", ["takfl-reg", "feddf", "fedet"])
@pytest.mark.parametrize("validation", [True, False])
def test_every_method_records_the_same_cap_and_the_steps_it_used(
    name: str, validation: bool
) -> None:
    protos, data = tiny_round()
    strategy = "search" if validation else "unsupervised"
    algo = resolve_algorithm(spec(), name, lambda_strategy=strategy, validation=validation)
    out, _ = server_step(protos, data, algo, seed=3)
    drawn = N if validation else N - math.ceil(0.1 * N)
    cap = 2 * math.ceil(drawn / 8)
    for p in "SML":
        info = out[p].info
        assert info["distill_cap"] == cap
        steps = {k: v for k, v in info.items() if k.startswith("distill_steps")}
        if name == "takfl-reg":
            assert set(steps) == {"distill_steps/S", "distill_steps/M", "distill_steps/L"}
        else:
            assert set(steps) == {"distill_steps"}
        assert all(1 <= v <= cap for v in steps.values())
        assert info["distill_gflop"] > 0


def test_a_fixed_budget_runs_every_takfl_distillation_to_the_cap() -> None:
    protos, data = tiny_round()
    algo = resolve_algorithm(spec(adaptive=False), "takfl-reg", lambda_strategy="search")
    out, _ = server_step(protos, data, algo, seed=3)
    for p in "SML":
        info = out[p].info
        assert all(info[f"distill_steps/{t}"] == info["distill_cap"] for t in "SML")


def test_without_validation_the_rule_scores_held_out_public_samples() -> None:
    _, data = tiny_round()
    b = plan_budget(DistillSpec(passes=1, batch_size=8), data.public_x, None, None, seed=1)
    assert b.holdout is not None and b.pool is not None
    assert len(b.holdout) == math.ceil(0.1 * N) and len(b.pool) == N - len(b.holdout)
    assert set(b.holdout.tolist()).isdisjoint(b.pool.tolist())
    targets = torch.randint(0, K, (3, N))
    rule = b.rule(targets)
    assert rule is not None
    assert torch.equal(rule.labels, targets[:, b.holdout])
    assert torch.equal(rule.x, data.public_x[b.holdout])
    again = plan_budget(DistillSpec(passes=1, batch_size=8), data.public_x, None, None, seed=1)
    assert again.holdout is not None and torch.equal(again.holdout, b.holdout)  # seeded
    with_val = plan_budget(DistillSpec(passes=1), data.public_x, data.val_x, data.val_y, seed=1)
    assert with_val.pool is None and with_val.holdout is None  # validation: all public data


def test_fixed_budget_keeps_the_published_baseline_checkpoint_and_no_takfl_rule() -> None:
    _, data = tiny_round()
    b = plan_budget(
        DistillSpec(steps=9, adaptive=False, eval_every=3, patience=6),
        data.public_x,
        data.val_x,
        data.val_y,
        seed=1,
    )
    assert b.rule(torch.zeros(N, dtype=torch.long)) is None
    published = b.baseline_rule(torch.zeros(N, dtype=torch.long))
    assert published is not None and (published.every, published.patience) == (3, 6)
    none = plan_budget(DistillSpec(steps=9, adaptive=False), data.public_x, None, None, seed=1)
    assert none.baseline_rule(torch.zeros(N, dtype=torch.long)) is None


def test_steps_info_names_each_distillation() -> None:
    from takfl.distill import Distilled

    runs = [Distilled(state={}, steps=4, best_step=2), Distilled(state={}, steps=7, best_step=7)]
    assert steps_info(runs, 7, ["S", "L"]) == {
        "distill_cap": 7.0,
        "distill_steps/S": 4.0,
        "distill_best/S": 2.0,
        "distill_steps/L": 7.0,
        "distill_best/L": 7.0,
    }


def test_the_budget_option_sets_the_rule_and_leaves_the_rest() -> None:
    from coordinator.cli import with_budget_rule
    from takfl.config import load_federation

    cfg = load_federation("digits")
    assert cfg.algorithm.distill.adaptive  # the default rule
    fixed = with_budget_rule(cfg, "fixed")
    assert not fixed.algorithm.distill.adaptive
    assert fixed.algorithm.distill.steps == cfg.algorithm.distill.steps
    assert fixed.model_dump(exclude={"algorithm"}) == cfg.model_dump(exclude={"algorithm"})
    assert with_budget_rule(fixed, "adaptive").algorithm.distill.adaptive
    assert with_budget_rule(cfg, None) is cfg
