"""The model zoo: every architecture builds, runs forward and backward, and is sized as
its tier requires."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import nn

from takfl.model_catalog import MODEL_OPTIONS
from takfl.models import (
    UnknownModelError,
    build_model,
    count_parameters,
    get_entry,
    model_names,
)
from takfl.models.registry import builder_options, register

SIGNAL_ZOO = ["cnn1d_small", "mlp1d", "resnet1d"]
ZOO = [
    *SIGNAL_ZOO,
    "cnn_digits_large",
    "cnn_digits_small",
    "mlp_digits",
    "mobilenetv2",
    "resnet14",
    "resnet18",
    "resnet8",
    "vgg11",
    "vgg16",
    "vit_s",
]
DIGITS_SHAPE = (1, 8, 8)
NUM_CLASSES = 7  # not 10, so a hard-coded head size would show


def logits_of(model: nn.Module, shape: tuple[int, int, int], batch: int = 3) -> torch.Tensor:
    torch.manual_seed(0)
    return model(torch.randn(batch, *shape))


def params(name: str, **kwargs: Any) -> int:
    return count_parameters(build_model(name, 10, **kwargs))


def test_registry_holds_the_whole_zoo() -> None:
    assert model_names() == sorted(ZOO)


@pytest.mark.parametrize("name", ZOO)
def test_builds_and_runs_on_its_default_shape(name: str) -> None:
    entry = get_entry(name)
    model = build_model(name, NUM_CLASSES)

    out = logits_of(model.eval(), entry.default_input_shape)

    assert out.shape == (3, NUM_CLASSES)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", SIGNAL_ZOO)
def test_signal_models_train_on_signals_in_both_layouts(name: str) -> None:
    """(B, C, 1, L) as the data path carries them, and plain (B, C, L)."""
    model = build_model(name, NUM_CLASSES, (2, 1, 40)).train()
    x = torch.randn(4, 2, 1, 40)
    out = model(x)
    nn.functional.cross_entropy(out, torch.arange(4) % NUM_CLASSES).backward()
    assert out.shape == (4, NUM_CLASSES)
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    torch.testing.assert_close(model(x), model(x.flatten(2)))
    with pytest.raises(ValueError, match="input shape"):
        build_model(name, NUM_CLASSES, (1, 8, 8))


def test_signal_tiers_are_far_apart_in_size() -> None:
    shape = (3, 1, 64)
    mlp = count_parameters(build_model("mlp1d", 8, shape, width=16))
    res = count_parameters(build_model("resnet1d", 8, shape))
    assert res > 15 * mlp


@pytest.mark.parametrize("name", [n for n in ZOO if n not in SIGNAL_ZOO])
def test_trains_on_8x8_digits(name: str) -> None:
    """Every family runs on one-channel 8x8 input and every parameter receives a gradient."""
    model = build_model(name, NUM_CLASSES, DIGITS_SHAPE).train()

    out = logits_of(model, DIGITS_SHAPE, batch=4)
    nn.functional.cross_entropy(out, torch.arange(4) % NUM_CLASSES).backward()

    assert out.shape == (4, NUM_CLASSES)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_vit_with_smaller_patches_on_digits() -> None:
    model = build_model("vit_s", NUM_CLASSES, DIGITS_SHAPE, patch=2)

    assert logits_of(model, DIGITS_SHAPE).shape == (3, NUM_CLASSES)
    # 16 patches of 2x2 plus the class token
    pos_embed = model.get_parameter("pos_embed")
    assert pos_embed.shape[1] == 17


def test_digits_models_default_to_the_digits_shape() -> None:
    for name in ("mlp_digits", "cnn_digits_small", "cnn_digits_large"):
        assert get_entry(name).default_input_shape == DIGITS_SHAPE


def test_eval_mode_is_deterministic_and_batch_independent() -> None:
    model = build_model("resnet8", NUM_CLASSES).eval()
    x = torch.randn(4, 3, 32, 32)

    with torch.no_grad():
        whole = model(x)
        first = model(x[:1])

    torch.testing.assert_close(whole[:1], first, rtol=1e-4, atol=1e-5)


def test_resnet18_has_the_paper_size() -> None:
    assert 10_500_000 < params("resnet18") < 12_000_000


def test_tiers_are_ordered_by_size() -> None:
    assert params("mlp_digits") < params("cnn_digits_small") < params("cnn_digits_large")
    assert params("resnet8") < params("resnet14") < params("resnet18")
    assert params("vgg11") < params("vgg16")
    assert params("mobilenetv2", width_mult=0.5) < params("mobilenetv2")


def test_digit_tiers_are_about_an_order_of_magnitude_apart() -> None:
    small, medium, large = (
        params(n) for n in ("mlp_digits", "cnn_digits_small", "cnn_digits_large")
    )
    assert medium > 3 * small
    assert large > 3 * medium


def test_builder_arguments_are_passed_through() -> None:
    narrow = build_model("mlp_digits", 10, width=8)
    wide = build_model("mlp_digits", 10, width=64)

    assert count_parameters(narrow) < count_parameters(wide)
    assert logits_of(narrow, DIGITS_SHAPE).shape == (3, 10)


def test_same_seed_gives_the_same_initial_weights() -> None:
    torch.manual_seed(3)
    a = build_model("cnn_digits_small", 10).state_dict()
    torch.manual_seed(3)
    b = build_model("cnn_digits_small", 10).state_dict()

    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(UnknownModelError) as exc:
        build_model("resnet99", 10)

    message = str(exc.value)
    assert "'resnet99'" in message
    assert all(name in message for name in ZOO)
    assert isinstance(exc.value, KeyError)
    with pytest.raises(UnknownModelError):
        get_entry("")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"num_classes": 1}, "at least 2"),
        ({"num_classes": 10, "input_shape": (8, 8)}, "(channels, height, width)"),
        ({"num_classes": 10, "input_shape": (1, 0, 8)}, "(channels, height, width)"),
    ],
)
def test_bad_build_arguments(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        build_model("mlp_digits", **kwargs)  # type: ignore[arg-type]


def test_inputs_a_model_cannot_take_are_refused() -> None:
    with pytest.raises(ValueError, match="too small"):
        build_model("cnn_digits_small", 10, (1, 3, 3))
    with pytest.raises(ValueError, match="not divisible"):
        build_model("vit_s", 10, (3, 30, 30))


def test_a_name_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register("resnet8", family="resnet", default_input_shape=(3, 32, 32))(
            lambda num_classes, input_shape: nn.Identity()
        )
    assert get_entry("resnet8").family == "resnet"


def test_the_torch_free_catalogue_matches_every_builder() -> None:
    # the config schema validates against MODEL_OPTIONS without importing torch
    assert sorted(MODEL_OPTIONS) == model_names()
    for name in model_names():
        assert MODEL_OPTIONS[name] == builder_options(get_entry(name).builder)


def test_a_builder_missing_from_the_catalogue_is_refused() -> None:
    with pytest.raises(ValueError, match="model_catalog"):
        register("resnet_unlisted", family="resnet", default_input_shape=(3, 32, 32))(
            lambda num_classes, input_shape: nn.Identity()
        )
    assert "resnet_unlisted" not in model_names()
