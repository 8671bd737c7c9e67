"""Shared pieces of the configuration schema."""

from __future__ import annotations

import inspect
import math
import typing
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

MAX_MODEL_ARG = 1_000_000  # magnitude cap of a numeric model argument


class Strict(BaseModel):
    """Base for every config model: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelSpec(Strict):
    """Which zoo builder to use and its arguments (see ``takfl.models``)."""

    builder: str
    args: dict[str, Any] = {}

    @field_validator("builder")
    @classmethod
    def _known_builder(cls, value: str) -> str:
        from takfl.models import model_names

        if value not in model_names():
            known = ", ".join(model_names())
            raise ValueError(f"unknown model {value!r}; expected one of: {known}")
        return value

    @field_validator("args")
    @classmethod
    def _builder_accepts(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        builder = info.data.get("builder")
        if builder is None:  # the builder itself was invalid and is reported already
            return value
        from takfl.models import get_entry

        params = inspect.signature(get_entry(builder).builder).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return value  # the builder takes any keyword
        accepted = sorted(set(params) - {"num_classes", "input_shape"})
        unknown = sorted(set(value) - set(accepted))
        if unknown:
            raise ValueError(
                f"{builder} takes no argument(s) {', '.join(unknown)}; "
                f"it accepts: {', '.join(accepted) or 'none'}"
            )
        hints = typing.get_type_hints(get_entry(builder).builder)
        problems = [
            problem
            for name, arg in value.items()
            if (problem := _check_arg(name, arg, hints.get(name, Any))) is not None
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return value


def _check_arg(name: str, value: Any, annotation: Any) -> str | None:
    """Why ``value`` does not fit the builder's annotation of ``name``, or None. Values
    are checked strictly (no list where a number goes, no bool for an int) and numbers
    are capped, so a config cannot make the builder allocate without bound."""
    if annotation is Any:
        return f"{name}: the builder does not declare its type; it cannot be set from a config"
    try:
        TypeAdapter(annotation).validate_python(value, strict=True)
    except ValidationError:
        shown = type(value).__name__
        return f"{name} must be {getattr(annotation, '__name__', annotation)}, got a {shown}"
    if isinstance(value, int | float) and not (
        math.isfinite(value) and abs(value) <= MAX_MODEL_ARG
    ):
        return f"{name} must be at most {MAX_MODEL_ARG:,} in magnitude, got {value!r}"
    return None
