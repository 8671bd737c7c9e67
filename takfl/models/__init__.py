"""The model zoo: builders registered by name (see ``registry``)."""

from takfl.models import mobilenet, resnet, signal, small, vgg, vit  # noqa: F401  (registration)
from takfl.models.registry import (
    ModelEntry,
    UnknownModelError,
    build_model,
    count_parameters,
    get_entry,
    model_names,
)

__all__ = [
    "ModelEntry",
    "UnknownModelError",
    "build_model",
    "count_parameters",
    "get_entry",
    "model_names",
]
