"""Shared pieces of the configuration schema."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator


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
            raise ValueError(f"unknown model {value!r}; expected one of: {', '.join(model_names())}")
        return value
