"""One local-training model (takfl.config.training.LocalTraining): the profile extends it,
the federation's override is derived from it, a task carries it, and one method applies
an override or a task's settings to a device's spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from coordinator.transport.base import Task
from coordinator.transport.dispatch import task_message
from takfl.config import (
    ConfigError,
    LocalTraining,
    ModelSpec,
    TrainingOverride,
    TrainingSpec,
    load_federation,
    prototype_training,
)
from takfl.config.profile import CommsSpec
from takfl.wire.chunking import blob_ref
from takfl.wire.messages import TrainingRef

DICTATED = ("epochs", "batch_size", "optimizer", "learning_rate", "weight_decay")
DEVICE = TrainingSpec(
    epochs=3, batch_size=16, backend="torch", threads=4, memory_limit_mb=512, time_budget_s=60.0
)


def test_every_form_has_the_dictated_fields_of_the_one_model() -> None:
    assert tuple(LocalTraining.model_fields) == DICTATED
    assert tuple(TrainingOverride.model_fields) == DICTATED
    assert tuple(TrainingRef.model_fields) == DICTATED
    assert issubclass(TrainingSpec, LocalTraining) and issubclass(TrainingRef, LocalTraining)
    assert set(TrainingSpec.model_fields) - set(DICTATED) == {
        "backend",
        "threads",
        "memory_limit_mb",
        "time_budget_s",
    }


def test_the_override_is_all_optional_and_keeps_the_models_bounds() -> None:
    assert TrainingOverride().model_dump() == dict.fromkeys(DICTATED)
    with pytest.raises(ValidationError, match="greater than 0"):
        TrainingOverride(epochs=0)
    with pytest.raises(ValidationError, match="'adam' or 'sgd'"):
        TrainingOverride(optimizer="lion")
    with pytest.raises(ValidationError, match="Extra inputs"):
        TrainingOverride(threads=2)


def test_an_override_replaces_only_what_it_sets() -> None:
    # Prepare
    override = TrainingOverride(batch_size=64, learning_rate=0.01)

    # Execute
    applied = DEVICE.with_dictated(override)

    # Assert: the override's two settings, the device's epochs and its own limits
    assert applied.batch_size == 64 and applied.learning_rate == 0.01
    assert applied.epochs == 3 and applied.optimizer == "adam"
    assert (applied.threads, applied.memory_limit_mb, applied.time_budget_s) == (4, 512, 60.0)
    assert DEVICE.with_dictated(None) is DEVICE


def test_a_tasks_settings_replace_the_dictated_ones_and_leave_the_device_its_own() -> None:
    # Prepare: what a task message carries
    ref = TrainingRef(epochs=7, batch_size=8, optimizer="sgd", learning_rate=0.05)

    # Execute
    applied = DEVICE.with_dictated(ref)

    # Assert
    assert (
        applied.dictated()
        == ref.dictated()
        == {
            "epochs": 7,
            "batch_size": 8,
            "optimizer": "sgd",
            "learning_rate": 0.05,
            "weight_decay": 0.0,
        }
    )
    assert (applied.backend, applied.threads, applied.memory_limit_mb) == ("torch", 4, 512)
    assert applied.time_budget_s == 60.0


def test_the_task_message_carries_the_dictated_settings() -> None:
    # Prepare: a task whose spec holds device-only fields the wire must not carry
    task = Task(
        round_id=1,
        prototype="S",
        client_id="S-000",
        model=ModelSpec(builder="mlp_digits"),
        global_state={},
        deadline=1e9,
        training=DEVICE,
    )

    # Execute
    msg = task_message(
        task,
        blob_ref(b"model", 1024),
        b"k" * 32,
        comms=CommsSpec(),
        num_classes=10,
        input_shape=(1, 8, 8),
    )

    # Assert
    assert msg.training is not None
    assert msg.training.model_dump() == DEVICE.dictated()


def test_the_wire_form_keeps_the_protocols_caps_and_strictness() -> None:
    with pytest.raises(ValidationError, match="less than or equal to 10000"):
        TrainingRef(epochs=10_001, batch_size=8, optimizer="sgd", learning_rate=0.1)
    with pytest.raises(ValidationError, match="Field required"):
        TrainingRef.model_validate({"epochs": 1, "batch_size": 8, "optimizer": "sgd"})
    with pytest.raises(ValidationError, match="valid integer"):
        TrainingRef.model_validate(
            {"epochs": "1", "batch_size": 8, "optimizer": "sgd", "learning_rate": 0.1}
        )


def test_a_federation_override_applies_to_the_profiles_training() -> None:
    cfg = load_federation("digits")

    spec = prototype_training(cfg, "M")  # raspberry-pi-5, overridden epochs/batch/lr

    assert (spec.epochs, spec.batch_size, spec.learning_rate) == (5, 16, 0.002)
    assert spec.threads == 4  # the board's own


def test_an_override_an_executorch_profile_cannot_train_is_refused(tmp_path: Path) -> None:
    # Prepare: S trains through ExecuTorch (SGD only); the config asks for Adam
    cfg = load_federation("digits").model_dump(mode="json")
    cfg["prototypes"][0]["training"]["optimizer"] = "adam"
    path = tmp_path / "adam-on-phones.yaml"
    path.write_text(yaml.safe_dump(cfg))

    # Execute / Assert
    with pytest.raises(ConfigError, match="SGD only") as exc:
        load_federation(path)
    assert [p.location for p in exc.value.problems] == ["prototypes.0.training.optimizer"]
