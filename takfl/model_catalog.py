"""The zoo's builder names and the typed keyword options each accepts, without torch.

The configuration schema checks a profile's ``model`` against this table, so listing and
validating profiles on a device never loads torch. ``registry.register`` refuses a builder
that is missing here or whose keyword options or their annotations differ, so the table
cannot drift from the builders.
"""

from __future__ import annotations

from typing import Any, Literal

# builder name -> {keyword option besides num_classes and input_shape: its annotated type}
MODEL_OPTIONS: dict[str, dict[str, Any]] = {
    "cnn1d_small": {"width": int},
    "cnn_digits_large": {},
    "cnn_digits_small": {},
    "mlp1d": {"width": int},
    "mlp_digits": {"depth": int, "width": int},
    "mobilenetv2": {"width_mult": float, "norm": Literal["batch", "group"]},
    "resnet14": {},
    "resnet1d": {"blocks": int, "width": int},
    "resnet18": {},
    "resnet8": {},
    "vgg11": {},
    "vgg16": {},
    "vit_s": {"patch": int},
}


def catalog_names() -> list[str]:
    return sorted(MODEL_OPTIONS)
