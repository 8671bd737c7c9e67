"""server_step, every algorithm unit and every lambda strategy on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from takfl.algorithms import AlgorithmError, algorithm_units, resolve_algorithm
from takfl.config import ALGORITHMS, LAMBDA_STRATEGIES, AlgorithmSpec
from takfl.distill import DistillSettings, EarlyStopping, distill, takfl_objective
from takfl.lambdas import (
    LambdaContext,
    fixed_row,
    heuristic_candidates,
    lambda_strategies,
    resolve_lambda_strategy,
)
from takfl.models import build_model
from takfl.server import PrototypeInput, StepData, server_step
from takfl.task_arithmetic import MergeScorer, task_vector

SHAPE = (1, 8, 8)
NAMES = ("S", "M", "L")


def tiny_spec(**changes: object) -> AlgorithmSpec:
    spec = {
        "distill": {"steps": 3, "batch_size": 8, "self_reg_weight": 0.5},
        "lambdas": {
            "candidates_per_exponent": 2,
            "search_candidates": 2,
            "learn_steps": 2,
            "matrix": [[0.2, 0.3, 0.5], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]],
        },
    }
    spec.update(changes)
    return AlgorithmSpec.model_validate(spec)


def tiny_round(missing: str | None = None) -> tuple[list[PrototypeInput], StepData]:
    """Three MLP prototypes with random teacher logits; ``missing`` returned no client."""
    torch.manual_seed(0)
    protos = []
    for i, name in enumerate(NAMES):
        model = build_model("mlp_digits", 10, SHAPE, width=4 + 4 * i)
        has = name != missing
        logits = [torch.randn(24, 10) * 3 for _ in range(2)] if has else []
        protos.append(
            PrototypeInput(
                name=name,
                model=model,
                avg_state={k: v.clone() for k, v in model.state_dict().items()},
                mean_logits=torch.stack(logits).mean(0) if has else None,
                num_clients=len(logits),
                client_logits=logits,
            )
        )
    data = StepData(torch.randn(24, *SHAPE), torch.randn(16, *SHAPE), torch.randint(0, 10, (16,)))
    return protos, data


def test_registries_match_the_config_names() -> None:
    assert set(algorithm_units()) == set(ALGORITHMS)
    assert set(lambda_strategies()) == set(LAMBDA_STRATEGIES)
    for unit in algorithm_units().values():
        assert unit.reference
    for strategy in lambda_strategies().values():
        assert strategy.reference


def test_unknown_names_are_errors_not_fallbacks() -> None:
    with pytest.raises(AlgorithmError, match="unknown algorithm 'fedprox'"):
        resolve_algorithm(tiny_spec(), "fedprox")
    with pytest.raises(AlgorithmError, match="unknown lambda strategy 'magic'"):
        resolve_algorithm(tiny_spec(), "takfl", lambda_strategy="magic")
    with pytest.raises(ValueError, match="unknown lambda strategy"):
        resolve_lambda_strategy("uniform")


def test_withholding_validation_refuses_strategies_that_need_it() -> None:
    with pytest.raises(AlgorithmError, match="withholds"):
        resolve_algorithm(tiny_spec(), "takfl", lambda_strategy="heuristic", validation=False)
    with pytest.raises(AlgorithmError, match="withholds"):
        resolve_algorithm(tiny_spec(), "takfl-scaled", lambda_strategy="fixed", validation=False)
    algo = resolve_algorithm(tiny_spec(), "takfl", lambda_strategy="fixed", validation=False)
    assert algo.validation is False and algo.lambda_strategy is not None


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_returns_a_state_per_prototype(name: str) -> None:
    protos, data = tiny_round()
    algo = resolve_algorithm(tiny_spec(), name, lambda_strategy="search")
    out, timings = server_step(protos, data, algo, seed=1)
    assert list(out) == list(NAMES)
    for p in protos:
        state = out[p.name].state
        assert state.keys() == p.avg_state.keys()
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    if algo.lambda_strategy is None:
        assert all(o.lambdas is None for o in out.values())
    else:
        for o in out.values():
            assert o.lambdas is not None and set(o.lambdas) == set(NAMES)
            assert sum(o.lambdas.values()) == pytest.approx(1.0, abs=1e-5)
    if name == "fedavg":
        for p in protos:  # nothing after aggregation
            assert all(torch.equal(out[p.name].state[k], v) for k, v in p.avg_state.items())
    else:
        assert timings["distill_s"] > 0


def test_takfl_is_the_merge_with_lambdas_summing_to_one_and_no_scale() -> None:
    """With fixed lambdas, takfl's state equals theta_avg + sum lambda_i tau_i exactly."""
    protos, data = tiny_round()
    spec = tiny_spec(distill={"steps": 3, "batch_size": 8, "adaptive": False})
    algo = resolve_algorithm(spec, "takfl", lambda_strategy="fixed")
    out, _ = server_step(protos, data, algo, seed=3)
    student = protos[1]
    settings = DistillSettings(steps=3, batch_size=8)
    taus = []
    for teacher in protos:
        assert teacher.mean_logits is not None
        theta = distill(
            student.model,
            student.avg_state,
            data.public_x,
            takfl_objective(teacher.mean_logits, None, spec.distill.temperature),
            settings,
            seed=3 * 1000 + 1,
        )
        taus.append(task_vector(theta, student.avg_state))
    for k, v in student.avg_state.items():
        if v.is_floating_point():
            want = v + 0.0 * taus[0][k] + 0.5 * taus[1][k] + 0.5 * taus[2][k]
            torch.testing.assert_close(out["M"].state[k], want)
    assert "scale" not in out["M"].info


def test_scaled_ablation_records_its_scale() -> None:
    protos, data = tiny_round()
    algo = resolve_algorithm(tiny_spec(), "takfl-scaled", lambda_strategy="fixed")
    out, _ = server_step(protos, data, algo, seed=0)
    for o in out.values():
        assert o.info["scale"] in (0.0, 0.5, 1.0)


def test_fixed_drops_a_missing_teacher_and_renormalises() -> None:
    """A prototype with no client this round: its column goes, the row sums to 1 again
    (this crashed with "2 task vectors but 3 coefficients" before)."""
    protos, data = tiny_round(missing="M")
    algo = resolve_algorithm(tiny_spec(), "takfl", lambda_strategy="fixed")
    out, _ = server_step(protos, data, algo, seed=0)
    assert out["S"].lambdas == pytest.approx({"S": 0.2 / 0.7, "L": 0.5 / 0.7})
    assert out["M"].lambdas == pytest.approx({"S": 0.0, "L": 1.0})


def test_fixed_row_properties() -> None:
    torch.testing.assert_close(fixed_row([0.2, 0.3, 0.5], [0, 2]), torch.tensor([2 / 7, 5 / 7]))
    torch.testing.assert_close(fixed_row([0.0, 0.0, 1.0], [0, 1]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="non-negative"):
        fixed_row([-0.1, 0.6, 0.5], [0, 1, 2])


def test_heuristic_candidates_follow_the_reference() -> None:
    cands = heuristic_candidates(3, per_exponent=5, order="ascending", seed=0)
    assert len(cands) == 1 + 3 * 5
    torch.testing.assert_close(cands[0], torch.full((3,), 1 / 3))
    for c in cands:
        assert torch.all(c >= 0)
        assert float(c.sum()) == pytest.approx(1.0, abs=1e-5)
    # the ascending prior: every draw gives the last teacher the largest weight
    assert all(int(c.argmax()) == 2 for c in cands[1:])
    unsorted = heuristic_candidates(3, per_exponent=5, order="unsorted", seed=0)
    assert {int(c.argmax()) for c in unsorted[1:]} != {2}


def _context(strategy: str, **spec_changes: object) -> LambdaContext:
    torch.manual_seed(0)
    model = build_model("mlp_digits", 10, SHAPE, width=8)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    vectors = []
    for s in (1, 2, 3):
        torch.manual_seed(s)
        other = build_model("mlp_digits", 10, SHAPE, width=8).state_dict()
        vectors.append(task_vector(other, base))
    x = torch.randn(64, *SHAPE)
    lam_spec = tiny_spec().lambdas.model_copy(update={"strategy": strategy, **spec_changes})
    return LambdaContext(
        scorer=MergeScorer(model, base, vectors, torch.device("cpu")),
        spec=lam_spec,
        student=0,
        teachers=[0, 1, 2],
        public_x=x,
        val_x=x,
        val_y=torch.randint(0, 10, (64,)),
        seed=0,
    )


@pytest.mark.parametrize("strategy", LAMBDA_STRATEGIES)
def test_every_lambda_strategy_stays_on_the_simplex_and_leaves_the_model_alone(
    strategy: str,
) -> None:
    ctx = _context(strategy)
    before = {k: v.clone() for k, v in ctx.scorer.model.state_dict().items()}
    choice = resolve_lambda_strategy(strategy).choose(ctx)
    assert choice.lambdas.shape == (3,)
    assert torch.all(choice.lambdas >= 0)
    assert float(choice.lambdas.sum()) == pytest.approx(1.0, abs=1e-5)
    for k, v in ctx.scorer.model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("strategy", ["heuristic", "search"])
def test_validation_strategies_pick_what_is_right_on_validation(strategy: str) -> None:
    ctx = _context(strategy)
    vertex = torch.tensor([0.0, 0.0, 1.0])  # labels made by the merge at teacher 2
    with torch.no_grad():
        y = ctx.scorer.logits(ctx.scorer.merged(vertex, 1.0), ctx.public_x).argmax(1)
    ctx = LambdaContext(**{**ctx.__dict__, "val_y": y})
    choice = resolve_lambda_strategy(strategy).choose(ctx)
    assert int(choice.lambdas.argmax()) == 2
    if strategy == "search":  # the vertex itself is a candidate
        assert choice.info["val_accuracy"] == pytest.approx(100.0)


def test_distillation_epochs_cover_the_public_set_and_weight_decay_shrinks() -> None:
    torch.manual_seed(0)
    student = build_model("mlp_digits", 10, SHAPE, width=8)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    x = torch.randn(40, *SHAPE)
    teacher = torch.zeros(40, 10)  # a teacher whose gradient vanishes near uniform output
    settings = DistillSettings(epochs=2, batch_size=16, learning_rate=1e-2)
    assert settings.total_steps(40) == 6
    seen: list[int] = []

    def objective(s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        seen.extend(idx.tolist())
        return takfl_objective(teacher, None, 3.0)(s, idx)

    distill(student, start, x, objective, settings, seed=0)
    assert sorted(seen) == sorted(list(range(40)) * 2)  # each sample once per epoch

    def norm(wd: float) -> float:
        s = DistillSettings(steps=30, batch_size=16, learning_rate=1e-2, weight_decay=wd)
        theta = distill(student, start, x, takfl_objective(teacher, None, 3.0), s, seed=0)
        return sum(float(v.norm()) for k, v in theta.items() if "weight" in k)

    assert norm(1.0) < norm(0.0)


def test_early_stopping_returns_the_best_checkpoint_on_validation() -> None:
    torch.manual_seed(0)
    student = build_model("mlp_digits", 10, SHAPE, width=8)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    x = torch.randn(64, *SHAPE)
    with torch.no_grad():
        y = student(x).argmax(1)  # the start is perfect on validation
    wrong = torch.nn.functional.one_hot((y + 1) % 10, 10).float() * 10  # a misleading teacher
    stopper = EarlyStopping(x=x, labels=y, every=5, patience=10)
    theta = distill(
        student,
        start,
        x,
        takfl_objective(wrong, None, 1.0),
        DistillSettings(steps=200, batch_size=16, learning_rate=5e-2),
        seed=0,
        early_stopping=stopper,
    )
    for k, v in start.items():
        assert torch.equal(theta[k], v)  # nothing beat the start: it is kept
