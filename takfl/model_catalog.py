"""The zoo's builder names and the keyword options each accepts, without importing torch.

The configuration schema checks a profile's ``model`` against this table, so listing and
validating profiles on a device never loads torch. ``registry.register`` refuses a builder
that is missing here or whose keyword options differ, so the table cannot drift from the
builders.
"""

from __future__ import annotations

# builder name -> keyword options besides num_classes and input_shape
MODEL_OPTIONS: dict[str, tuple[str, ...]] = {
    "cnn_digits_large": (),
    "cnn_digits_small": (),
    "mlp_digits": ("depth", "width"),
    "mobilenetv2": ("width_mult",),
    "resnet14": (),
    "resnet18": (),
    "resnet8": (),
    "vgg11": (),
    "vgg16": (),
    "vit_s": ("patch",),
}


def catalog_names() -> list[str]:
    return sorted(MODEL_OPTIONS)
