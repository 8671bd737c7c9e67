"""Shared pieces of the configuration schema."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from takfl.model_catalog import MODEL_OPTIONS, catalog_names


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
        if value not in MODEL_OPTIONS:
            known = ", ".join(catalog_names())
            raise ValueError(f"unknown model {value!r}; expected one of: {known}")
        return value

    @field_validator("args")
    @classmethod
    def _builder_accepts(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        builder = info.data.get("builder")
        if builder is None:  # the builder itself was invalid and is reported already
            return value
        accepted = sorted(MODEL_OPTIONS[builder])
        unknown = sorted(set(value) - set(accepted))
        if unknown:
            raise ValueError(
                f"{builder} takes no argument(s) {', '.join(unknown)}; "
                f"it accepts: {', '.join(accepted) or 'none'}"
            )
        return value
