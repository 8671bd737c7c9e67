"""The part of a received JSON object a message model knows: what a receiver reads of a
message of a higher minor version (which may add optional fields, nested ones included).
The rest is ignored, not refused; the signature still covers it (the signed bytes come
from the whole received object)."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The one model class inside a field's type (``M``, ``M | None``, ``Annotated[M, ...]``),
    or None when there is none or more than one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = {m for arg in typing.get_args(annotation) if (m := nested_model(arg)) is not None}
    return found.pop() if len(found) == 1 else None


def known_part(model: type[BaseModel], obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with only the keys ``model`` has a field for, recursively into nested models."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        key = info.alias or name
        if key not in obj:
            continue
        value = obj[key]
        nested = nested_model(info.annotation)
        if nested is not None and isinstance(value, dict):
            value = known_part(nested, value)
        out[key] = value
    return out
