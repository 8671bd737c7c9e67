"""Shared pieces of the configuration schema."""

from __future__ import annotations

import inspect
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


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
        return value
