"""Registry of model builders, looked up by the name a device profile gives."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from takfl.model_catalog import MODEL_OPTIONS

Builder = Callable[..., nn.Module]


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    """One registered architecture.

    ``default_input_shape`` is (channels, height, width) of the data the
    architecture was designed for; every builder also accepts other shapes.
    """

    name: str
    builder: Builder
    family: str
    default_input_shape: tuple[int, int, int]
    reference: str


_REGISTRY: dict[str, ModelEntry] = {}


class UnknownModelError(KeyError):
    """Raised when a profile names a model that is not registered."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown model {self.name!r}; known models: {', '.join(model_names())}"


def register(
    name: str, *, family: str, default_input_shape: tuple[int, int, int], reference: str = ""
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(num_classes, input_shape, **kwargs) -> nn.Module``."""

    def wrap(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        options = builder_options(builder)
        if MODEL_OPTIONS.get(name) != options:
            shown = {k: v.__name__ for k, v in sorted(options.items())}
            raise ValueError(
                f"model {name!r} takes options {shown}; list them in takfl/model_catalog.py "
                f"as MODEL_OPTIONS[{name!r}]"
            )
        _REGISTRY[name] = ModelEntry(
            name=name,
            builder=builder,
            family=family,
            default_input_shape=default_input_shape,
            reference=reference,
        )
        return builder

    return wrap


def builder_options(builder: Builder) -> dict[str, Any]:
    """The keyword options of a builder besides ``num_classes`` and ``input_shape``, with
    their annotations (``Any`` where there is none)."""
    hints = typing.get_type_hints(builder)
    params = set(inspect.signature(builder).parameters) - {"num_classes", "input_shape"}
    return {name: hints.get(name, Any) for name in params}


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(name) from None


def build_model(
    name: str,
    num_classes: int,
    input_shape: tuple[int, int, int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: registered builder name, e.g. ``"resnet18"``.
        num_classes: size of the output logits.
        input_shape: (C, H, W) of one sample; the entry's default when omitted.
        **kwargs: builder-specific arguments (e.g. ``width`` for the MLP).
    Returns:
        a module mapping a float tensor (B, C, H, W) to logits (B, num_classes).
    """
    entry = get_entry(name)
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    shape = tuple(input_shape) if input_shape is not None else entry.default_input_shape
    if len(shape) != 3 or any(int(s) <= 0 for s in shape):
        raise ValueError(f"input_shape must be (channels, height, width), got {shape}")
    return entry.builder(
        num_classes=num_classes, input_shape=tuple(int(s) for s in shape), **kwargs
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
