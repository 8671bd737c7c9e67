"""Local training: the settings the coordinator dictates to a prototype's clients,
declared once in :class:`LocalTraining`.

Every other form is built from it:

- a device profile's ``training`` (``takfl.config.profile.TrainingSpec``) extends it
  with what the device keeps for itself (backend, threads, memory cap, time budget),
  so a profile's YAML stays one flat ``training:`` mapping;
- a federation config's per-prototype override (:data:`TrainingOverride`) is derived
  from it here, field by field, each optional;
- a task carries it on the wire (``takfl.wire.messages.TrainingRef``, a
  ``LocalTraining`` under the protocol's caps);
- :meth:`LocalTraining.with_dictated` applies an override or a task's settings to a
  spec, on the coordinator and on the agent alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, Field, create_model
from pydantic.fields import FieldInfo
from typing_extensions import Self

from takfl.config.base import Strict

Optimizer = Literal["adam", "sgd"]


class LocalTraining(Strict):
    """Local-training settings the coordinator dictates for a prototype's clients (the
    device keeps its own backend, threads, memory cap and time budget)."""

    epochs: int = Field(1, gt=0)  # local epochs per round (E)
    batch_size: int = Field(32, gt=0)
    optimizer: Optimizer = "adam"
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)

    def dictated(self) -> dict[str, Any]:
        """The dictated settings alone, by field name (a subclass's own fields left out)."""
        return self.model_dump(include=set(LocalTraining.model_fields))

    def with_dictated(self, settings: BaseModel | None) -> Self:
        """A copy whose dictated settings are ``settings``' (a :class:`LocalTraining`, or a
        :data:`TrainingOverride` whose unset fields keep this one's); every other field,
        the device's own, is kept. None: this spec as it is."""
        if settings is None:
            return self
        update = settings.model_dump(include=set(LocalTraining.model_fields), exclude_none=True)
        return self.model_copy(update=update)


def optional_form(model: type[BaseModel], name: str, doc: str) -> type[Strict]:
    """A config model named ``name`` with every field of ``model``, each optional (None:
    not given) and checked with ``model``'s constraints when given."""
    fields: dict[str, Any] = {
        field_name: (_optional(info), None) for field_name, info in model.model_fields.items()
    }
    return create_model(name, __base__=Strict, __doc__=doc, __module__=__name__, **fields)


def _optional(info: FieldInfo) -> Any:
    """A field's type, None allowed, with its constraints (bounds) kept."""
    declared: Any = info.annotation
    kind = declared | None
    return Annotated[(kind, *info.metadata)] if info.metadata else kind


if TYPE_CHECKING:  # fields made at run time: only ever applied, never read one by one
    TrainingOverride = Strict
else:
    TrainingOverride = optional_form(
        LocalTraining,
        "TrainingOverride",
        "Local-training settings the coordinator dictates for a prototype; the device\n"
        "profile keeps its own limits (threads, memory, time budget).",
    )
