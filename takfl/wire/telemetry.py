"""Telemetry an agent reports with its registration and with every update.

It travels inside the signed JSON header (``Registration.telemetry``,
``UpdateHeader.telemetry``), so it is authenticated like the rest of the header,
and it is decoded as strictly: unknown keys, wrong types, non-finite numbers and
values outside the bounds below are refused with the message.

Fields (every one optional; an agent reports what its platform can tell):

    platform.machine / system / release   platform.machine(), .system(), .release()
    platform.python                        Python version, e.g. "3.11.2"
    platform.torch                         torch build, e.g. "2.13.0+cpu"
    platform.accelerator                   "cuda 12.4", "mps", or None (CPU only)
    platform.cpus                          logical CPUs the OS reports
    platform.runtimes                      inference runtime -> version (onnxruntime, ...)
    train_s                                wall time of local training for this task
    samples_per_s                          training samples processed per second
    peak_rss_mb / rss_limit_mb             peak resident memory of the agent process,
                                           and the profile's limit (None: no limit)
    threads                                torch threads used for training
    bytes_sent / bytes_received            MQTT payload bytes since the agent started
    retries                                update headers announced again + reconnects
    deadline_slack_s                       task deadline minus the time the update was
                                           sent (negative: late)

The schema's bounds only keep numbers sane. What a device can really report depends on
the device and the round: :func:`implausible` names the values outside a
:class:`Plausibility` (memory over the device's, times or deadline slack past the
round's deadline x k), which a receiver stores flagged, never as measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_RUNTIMES = 8  # entries in platform.runtimes
_BIG = 1e9

Short = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Text = Annotated[str, StringConstraints(max_length=128)]
Seconds = Annotated[float, Field(ge=0.0, le=_BIG, allow_inf_nan=False)]
Megabytes = Annotated[float, Field(ge=0.0, le=_BIG, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=2**53)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class PlatformInfo(_Strict):
    """What the agent runs on."""

    machine: Text = ""
    system: Text = ""
    release: Text = ""
    python: Text = ""
    torch: Text = ""
    accelerator: Text | None = None
    cpus: Annotated[int, Field(ge=0, le=1 << 20)] = 0
    runtimes: Annotated[dict[Short, Short], Field(max_length=MAX_RUNTIMES)] = {}


class Telemetry(_Strict):
    """One report of an agent (see the module docstring for every field)."""

    platform: PlatformInfo | None = None
    train_s: Seconds | None = None
    samples_per_s: Annotated[float, Field(ge=0.0, le=_BIG, allow_inf_nan=False)] | None = None
    peak_rss_mb: Megabytes | None = None
    rss_limit_mb: Megabytes | None = None
    threads: Annotated[int, Field(ge=1, le=4096)] | None = None
    bytes_sent: Count = 0
    bytes_received: Count = 0
    retries: Count = 0
    deadline_slack_s: Annotated[float, Field(ge=-_BIG, le=_BIG, allow_inf_nan=False)] | None = None


@dataclass(frozen=True, kw_only=True)
class Plausibility:
    """What one tier's devices can report: at most ``memory_mb`` of memory (the profile's
    limit, else its hardware class's), at most ``seconds`` of training, and a deadline
    slack within ``[-seconds, seconds]`` (``seconds``: the round's deadline x k)."""

    memory_mb: float
    seconds: float

    def __post_init__(self) -> None:
        for name in ("memory_mb", "seconds"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v}")


MEMORY_FIELDS = ("peak_rss_mb", "rss_limit_mb")


def implausible(telemetry: Telemetry, bounds: Plausibility) -> dict[str, float]:
    """Field -> reported value for every value ``bounds`` says the device cannot have
    measured (empty when all are plausible)."""
    out: dict[str, float] = {}
    for name in MEMORY_FIELDS:
        v = getattr(telemetry, name)
        if v is not None and v > bounds.memory_mb:
            out[name] = v
    if telemetry.train_s is not None and telemetry.train_s > bounds.seconds:
        out["train_s"] = telemetry.train_s
    slack = telemetry.deadline_slack_s
    if slack is not None and abs(slack) > bounds.seconds:
        out["deadline_slack_s"] = slack
    return out
