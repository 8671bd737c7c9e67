"""Properties of the algorithm's pure functions on tiny tensors and tiny models."""

from __future__ import annotations

import pytest
import torch

from takfl.baselines import feddf_target, fedet_targets
from takfl.distill import DistillSettings, distill, kd_loss, takfl_objective
from takfl.fedavg import FedAvgAccumulator, fedavg
from takfl.logits import MeanLogits
from takfl.models import build_model
from takfl.task_arithmetic import (
    MergeScorer,
    merge,
    prediction_entropy,
    project_simplex,
    simplex_candidates,
    task_vector,
)


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model("cnn_digits_small", 10, (1, 8, 8)).state_dict()


def test_fedavg_of_identical_models_is_that_model() -> None:
    state = tiny_state(0)
    avg = fedavg([state, state, state], [3.0, 1.0, 7.0])
    for k, v in state.items():
        assert avg[k].dtype == v.dtype
        torch.testing.assert_close(avg[k], v)


def test_fedavg_respects_weights_including_batchnorm_buffers() -> None:
    a, b = tiny_state(1), tiny_state(2)
    a["features.1.running_mean"] = torch.full_like(a["features.1.running_mean"], 1.0)
    b["features.1.running_mean"] = torch.full_like(b["features.1.running_mean"], 5.0)
    a["features.1.num_batches_tracked"] = torch.tensor(10)
    b["features.1.num_batches_tracked"] = torch.tensor(20)
    avg = fedavg([a, b], [3.0, 1.0])
    torch.testing.assert_close(
        avg["features.1.running_mean"], torch.full_like(a["features.1.running_mean"], 2.0)
    )
    assert avg["features.1.num_batches_tracked"].dtype == torch.int64
    assert int(avg["features.1.num_batches_tracked"]) == round((3 * 10 + 20) / 4)
    k = "head.1.weight"
    torch.testing.assert_close(avg[k], 0.75 * a[k] + 0.25 * b[k])


def test_fedavg_streaming_equals_batch_and_rejects_bad_input() -> None:
    states = [tiny_state(i) for i in range(3)]
    acc = FedAvgAccumulator()
    for s, w in zip(states, [1.0, 2.0, 3.0], strict=True):
        acc.add(s, w)
    batch = fedavg(states, [1.0, 2.0, 3.0])
    for k in batch:
        torch.testing.assert_close(acc.result()[k], batch[k])
    with pytest.raises(ValueError, match="positive"):
        acc.add(states[0], 0.0)
    with pytest.raises(ValueError, match="keys"):
        acc.add({"other": torch.zeros(1)}, 1.0)
    with pytest.raises(ValueError, match="no client"):
        FedAvgAccumulator().result()


def test_mean_logits_streams_the_mean() -> None:
    zs = [torch.randn(5, 3) for _ in range(4)]
    acc = MeanLogits()
    for z in zs:
        acc.add(z)
    torch.testing.assert_close(acc.mean(), torch.stack(zs).mean(0))


def test_merge_with_one_hot_lambda_equals_that_distilled_model() -> None:
    base, t1, t2 = tiny_state(0), tiny_state(1), tiny_state(2)
    vectors = [task_vector(t1, base), task_vector(t2, base)]
    merged = merge(base, vectors, torch.tensor([0.0, 1.0]))
    for k, v in t2.items():
        if v.is_floating_point():
            torch.testing.assert_close(merged[k], v)
        else:
            assert torch.equal(merged[k], base[k])  # integer buffers are not merged
    zero = merge(base, vectors, torch.tensor([0.5, 0.5]), scale=0.0)
    for k in base:
        torch.testing.assert_close(zero[k], base[k])


@pytest.mark.parametrize("v", [[0.2, 0.3, 0.5], [5.0, -1.0, 0.0], [-3.0, -3.0], [0.9]])
def test_projection_lands_on_the_simplex(v: list[float]) -> None:
    p = project_simplex(torch.tensor(v))
    assert torch.all(p >= 0)
    assert abs(float(p.sum()) - 1.0) < 1e-6
    if min(v) >= 0 and abs(sum(v) - 1) < 1e-9:
        torch.testing.assert_close(p, torch.tensor(v))


def test_candidates_are_on_the_simplex() -> None:
    c = simplex_candidates(3, 20, seed=0)
    assert c.shape == (3 + 1 + 20, 3)
    assert torch.all(c >= 0)
    torch.testing.assert_close(c.sum(1), torch.ones(len(c)))


def _scorer() -> tuple[MergeScorer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("mlp_digits", 10, (1, 8, 8), width=8)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    vectors = [task_vector(tiny_mlp(s), base) for s in (1, 2, 3)]
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    return MergeScorer(model, base, vectors, torch.device("cpu")), x, y


def tiny_mlp(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model("mlp_digits", 10, (1, 8, 8), width=8).state_dict()


def test_scorer_matches_an_explicit_merge() -> None:
    scorer, x, y = _scorer()
    lam = torch.tensor([0.2, 0.3, 0.5])
    model = build_model("mlp_digits", 10, (1, 8, 8), width=8).eval()
    model.load_state_dict(
        merge(
            scorer.base,
            [{k: scorer.stacked[k][i] for k in scorer.stacked} for i in range(3)],
            lam,
            0.7,
        )
    )
    acc, loss = scorer.score(lam, 0.7, x, y)
    with torch.no_grad():
        out = model(x)
    assert acc == pytest.approx(float((out.argmax(1) == y).float().mean()))
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(out, y)), rel=1e-5)


def test_kd_loss_is_zero_when_student_equals_teacher_and_positive_otherwise() -> None:
    z = torch.randn(16, 10)
    assert float(kd_loss(z, z, 3.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(z, torch.randn(16, 10), 3.0)) > 0.0


def test_entropy_is_lower_for_confident_predictions() -> None:
    flat = torch.zeros(4, 10)
    sharp = torch.eye(10)[:4] * 20
    assert float(prediction_entropy(flat)) == pytest.approx(torch.log(torch.tensor(10.0)).item())
    assert float(prediction_entropy(sharp)) < 1e-3


SETTINGS = DistillSettings(steps=100, batch_size=32, learning_rate=1e-2)


def test_distillation_moves_the_student_toward_the_teacher_and_keeps_start() -> None:
    torch.manual_seed(0)
    student = build_model("mlp_digits", 10, (1, 8, 8), width=16)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    x = torch.randn(128, 1, 8, 8)
    with torch.no_grad():  # a teacher the student's architecture can represent
        teacher = build_model("mlp_digits", 10, (1, 8, 8), width=16)(x) * 5
        before = float(kd_loss(student(x), teacher, 3.0))
    obj = takfl_objective(teacher, None, 3.0)
    theta = distill(student, start, x, obj, SETTINGS, seed=0)
    student.load_state_dict(theta)
    with torch.no_grad():
        assert float(kd_loss(student(x), teacher, 3.0)) < 0.5 * before
    # the same seed gives the same distilled weights
    again = distill(student, start, x, obj, SETTINGS, seed=0)
    for k in theta:
        torch.testing.assert_close(theta[k], again[k])


def test_self_regularisation_keeps_the_student_closer_to_its_start() -> None:
    torch.manual_seed(0)
    student = build_model("mlp_digits", 10, (1, 8, 8), width=16)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    x = torch.randn(128, 1, 8, 8)
    with torch.no_grad():
        own = student(x)
    teacher = torch.randn(128, 10) * 3
    settings = DistillSettings(steps=60, batch_size=32, learning_rate=1e-2)

    def drift(gamma: float) -> float:
        theta = distill(
            student, start, x, takfl_objective(teacher, own, 3.0, gamma, 20.0), settings, seed=0
        )
        return sum(float((theta[k] - start[k]).norm()) for k in start)

    assert drift(10.0) < drift(0.0)


def test_feddf_target_is_the_all_client_mean() -> None:
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    torch.testing.assert_close(feddf_target([a, b], [3, 1]), (3 * a + b) / 4)


def test_fedet_consensus_weights_confident_clients_and_finds_dissent() -> None:
    confident = torch.tensor([[20.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    unsure = torch.tensor([[0.0, 0.1, 0.0], [0.0, 0.0, 1.0]])
    labels, diverse, has = fedet_targets([confident, unsure])
    assert labels.tolist() == [0, 2]  # the confident (high logit variance) client decides
    assert has.tolist() == [True, False]  # sample 0: the unsure client votes for class 1
    torch.testing.assert_close(diverse[0], unsure[0])  # the only dissenter's logits
    torch.testing.assert_close(diverse[1], torch.zeros(3))
