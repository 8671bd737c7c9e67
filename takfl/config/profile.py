"""Device profile: what one kind of device trains, runs and sends, and within which limits."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from takfl.config.base import ModelSpec, Strict
from takfl.config.training import LocalTraining
from takfl.wire.codec_names import parse_codec

HardwareClass = Literal["workstation", "jetson", "raspberry-pi", "phone", "microcontroller"]
# The most memory (MB) a device of each class has: what its telemetry may plausibly report
# when its profile sets no memory limit (takfl.wire.telemetry.Plausibility).
HARDWARE_MEMORY_MB: dict[HardwareClass, int] = {
    "workstation": 4 * 1024 * 1024,  # 4 TiB: the largest workstations and servers
    "jetson": 64 * 1024,  # Jetson AGX Orin 64 GB
    "raspberry-pi": 16 * 1024,  # Raspberry Pi 5 16 GB
    "phone": 24 * 1024,  # the largest phones
    "microcontroller": 64,  # boards with external PSRAM
}


TrainingBackend = Literal["torch", "executorch"]


class TrainingSpec(LocalTraining):
    """A device's local training: the settings the coordinator may dictate, and what the
    device keeps for itself (backend, threads, memory cap, time budget)."""

    # Local training engine: torch, or a training program run by the ExecuTorch runtime
    # (phones; the coordinator ships the program; SGD only).
    backend: TrainingBackend = "torch"
    threads: int = Field(1, ge=1)  # torch intra-op threads
    memory_limit_mb: int | None = Field(None, gt=0)  # address-space cap for the agent process
    time_budget_s: float | None = Field(None, gt=0)  # stop local training after this long

    @model_validator(mode="after")
    def _backend_supports_optimizer(self) -> TrainingSpec:
        if self.backend == "executorch" and self.optimizer != "sgd":
            raise ValueError(
                "backend executorch trains with its runtime's SGD only: set optimizer: sgd"
            )
        return self


class InferenceSpec(Strict):
    runtime: Literal["onnxruntime", "ai-edge-litert", "tflite-runtime", "torch"] = "onnxruntime"
    format: Literal["onnx", "tflite", "torch"] = "onnx"
    quantization: Literal["none", "int8", "dynamic"] = "none"
    threads: int = Field(1, ge=1)
    # A release installs only if its batch-1 p99 latency here is within this budget
    # (milliseconds; None: no budget) and its model file within this memory (MB; None:
    # no check).
    latency_budget_ms: float | None = Field(None, gt=0)
    memory_limit_mb: int | None = Field(None, gt=0)


def _codec_choice(text: str) -> str:
    """A codec choice (takfl.wire.codec_names) in its canonical text."""
    return str(parse_codec(text))


CodecText = Annotated[str, AfterValidator(_codec_choice)]


class CommsSpec(Strict):
    chunk_size_kib: int = Field(128, gt=0, le=16384)  # MQTT payload chunk size
    # update delta encoding: a codec choice, e.g. fp16, int8, sign1:density=0.6
    compression: CodecText = "fp16"
    # the global model as a delta against the one the agent holds, through this codec
    # (e.g. rot2, sign1); None: the full fp32 model every round
    downstream: CodecText | None = None
    qos: Literal[0, 1, 2] = 1
    keepalive_s: int = Field(30, gt=0)


class ScheduleSpec(Strict):
    max_tasks_per_hour: int | None = Field(None, gt=0)
    require_charging: bool = False  # phones: train only while charging
    task_deadline_s: float = Field(300.0, gt=0)  # give up a task after this long


class DeviceProfile(Strict):
    """One device tier: parsed from a YAML file in ``profiles/devices/`` or a user path."""

    name: str
    prototype: str  # the prototype (tier) these devices belong to
    hardware_class: HardwareClass
    description: str = ""
    model: ModelSpec
    training: TrainingSpec = TrainingSpec()
    inference: InferenceSpec = InferenceSpec()
    comms: CommsSpec = CommsSpec()
    schedule: ScheduleSpec = ScheduleSpec()
