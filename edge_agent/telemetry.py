"""What an agent reports about itself (``takfl.wire.telemetry``): its platform once,
and per task its training time, throughput, memory, traffic, retries and slack."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time

import torch

from edge_agent.limits import peak_rss_mb
from takfl.config.profile import TrainingSpec
from takfl.wire.telemetry import PlatformInfo, Telemetry

# Inference runtimes whose versions are reported when installed (distribution names).
RUNTIMES = ("onnxruntime", "ai-edge-litert", "tflite-runtime", "executorch")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def accelerator() -> str | None:
    """The accelerator torch can use here, or None on a CPU-only build or machine."""
    if torch.cuda.is_available():
        return f"cuda {torch.version.cuda}"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return None


def platform_info() -> PlatformInfo:
    """The machine, OS, Python, torch build and inference runtimes of this process."""
    runtimes = {name: v for name in RUNTIMES if (v := _version(name)) is not None}
    return PlatformInfo(
        machine=platform.machine()[:128],
        system=platform.system()[:128],
        release=platform.release()[:128],
        python=platform.python_version(),
        torch=torch.__version__[:128],
        accelerator=accelerator(),
        cpus=os.cpu_count() or 0,
        runtimes=runtimes,
    )


def task_telemetry(
    info: PlatformInfo,
    spec: TrainingSpec,
    *,
    train_s: float | None,
    samples: int,
    bytes_sent: int,
    bytes_received: int,
    retries: int,
    deadline: float | None,
) -> Telemetry:
    """One telemetry report; ``samples`` training samples were processed in ``train_s``."""
    peak = peak_rss_mb()
    rate = samples / train_s if train_s and train_s > 0 else None
    return Telemetry(
        platform=info,
        train_s=train_s,
        samples_per_s=rate,
        peak_rss_mb=peak,
        rss_limit_mb=float(spec.memory_limit_mb) if spec.memory_limit_mb is not None else None,
        threads=torch.get_num_threads(),
        bytes_sent=bytes_sent,
        bytes_received=bytes_received,
        retries=retries,
        deadline_slack_s=None if deadline is None else deadline - time.time(),
    )
