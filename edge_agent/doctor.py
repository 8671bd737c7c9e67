"""``takfl-agent doctor``'s verdicts: pure functions from measured facts to a ``Check``.

Each function takes what was measured on the device (and the profile) and says OK, WARN or
FAIL with the fix. Measuring is in ``doctor_probe`` (child processes, /proc, the broker).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from takfl.config.profile import DeviceProfile

MIN_PYTHON = (3, 10)
MIN_FREE_DISK_MB = 512  # models, checkpoints and logs of a few rounds, with room to spare
CLOCK_TOLERANCE_S = 5.0


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def ok(name: str, detail: str) -> Check:
    return Check(name, Status.OK, detail)


def check_platform(machine: str, system: str, python: tuple[int, int, int]) -> list[Check]:
    version = ".".join(map(str, python))
    checks = []
    if machine in ("armv7l", "armv6l", "i686"):
        checks.append(
            Check(
                "platform",
                Status.FAIL,
                f"{system} {machine}: a 32-bit OS",
                "install the 64-bit OS (uname -m must print aarch64): torch, onnxruntime "
                "and ai-edge-litert publish no 32-bit ARM wheels",
            )
        )
    else:
        checks.append(ok("platform", f"{system} {machine}"))
    if python[:2] < MIN_PYTHON:
        checks.append(
            Check(
                "python",
                Status.FAIL,
                version,
                "takfl-edge needs Python 3.10 or newer: create the venv with a newer python3",
            )
        )
    else:
        checks.append(ok("python", version))
    return checks


def check_torch(probe: dict[str, Any], profile: DeviceProfile) -> Check:
    """``probe``: what a child process that imported torch reported (``error`` if it could
    not): version, cuda (the CUDA version it was built for, or None), cuda_available,
    threads, import_s."""
    if "error" in probe:
        return Check(
            "torch",
            Status.FAIL,
            f"cannot import torch: {probe['error']}",
            "install the agent with the constraints file: pip install -c constraints.txt "
            "'takfl-edge[agent]' (on a Jetson: NVIDIA's torch first, see firmware_notes/jetson.md)",
        )
    build = f"CUDA {probe['cuda']}" if probe.get("cuda") else "CPU"
    detail = (
        f"{probe['version']} ({build} build, GPU {'yes' if probe['cuda_available'] else 'no'}), "
        f"{probe['threads']} threads, import {probe['import_s']:.1f} s"
    )
    if profile.hardware_class == "jetson" and not probe["cuda_available"]:
        return Check(
            "torch",
            Status.WARN,
            detail,
            "this torch does not use the Jetson's GPU: install NVIDIA's torch for your "
            "JetPack (firmware_notes/jetson.md)",
        )
    if probe.get("cuda") and not probe["cuda_available"] and profile.hardware_class != "jetson":
        return Check(
            "torch",
            Status.WARN,
            detail,
            "a CUDA build on a device without a usable GPU: it costs gigabytes for nothing; "
            "reinstall in a fresh venv with the constraints file (CPU torch on boards)",
        )
    return ok("torch", detail)


def check_runtime(runtime: str, usable: bool, reason: str) -> Check:
    name = f"runtime {runtime}"
    if usable:
        return ok(name, "importable")
    return Check(name, Status.FAIL, reason, f"install it into the agent's venv ({reason})")


def check_resources(
    profile: DeviceProfile,
    *,
    total_mb: float | None,
    available_mb: float | None,
    free_disk_mb: float,
    cores: int,
) -> list[Check]:
    checks = []
    limit = profile.training.memory_limit_mb
    if total_mb is None:
        checks.append(Check("memory", Status.WARN, "unknown (no /proc/meminfo)"))
    elif limit is not None and total_mb < limit:
        checks.append(
            Check(
                "memory",
                Status.FAIL,
                f"{total_mb:.0f} MB in all, the profile allows the agent {limit} MB",
                "choose a profile for a smaller device, or lower training.memory_limit_mb "
                "and batch_size in a copy of the profile",
            )
        )
    elif limit is not None and available_mb is not None and available_mb < limit:
        checks.append(
            Check(
                "memory",
                Status.WARN,
                f"{available_mb:.0f} MB available of {total_mb:.0f} MB, profile limit {limit} MB",
                "stop other services while the agent trains, or lower the profile's limit",
            )
        )
    else:
        limit_text = f", profile limit {limit} MB" if limit is not None else ""
        checks.append(ok("memory", f"{total_mb:.0f} MB{limit_text}"))
    if free_disk_mb < MIN_FREE_DISK_MB:
        checks.append(
            Check(
                "disk",
                Status.FAIL,
                f"{free_disk_mb:.0f} MB free",
                f"free at least {MIN_FREE_DISK_MB} MB for models and checkpoints",
            )
        )
    else:
        checks.append(ok("disk", f"{free_disk_mb:.0f} MB free"))
    threads = max(profile.training.threads, profile.inference.threads)
    if threads > cores:
        checks.append(
            Check(
                "cores",
                Status.WARN,
                f"{cores} core(s), the profile asks for {threads} threads",
                "pass --threads to `takfl-agent run`, or lower training/inference.threads in "
                "a copy of the profile",
            )
        )
    else:
        checks.append(ok("cores", f"{cores} core(s), profile threads {threads}"))
    return checks


def check_clock(local_now: float, coordinator_time: float | None, ntp_synced: bool | None) -> Check:
    """The coordinator's retained status carries the time it came online by its clock: a
    local clock behind that is certainly wrong (a lower bound on the offset; a clock ahead
    is not detectable this way)."""
    ntp = {True: "NTP synchronised", False: "NTP not synchronised", None: "NTP state unknown"}
    if coordinator_time is not None and coordinator_time - local_now > CLOCK_TOLERANCE_S:
        return Check(
            "clock",
            Status.FAIL,
            f"at least {coordinator_time - local_now:.0f} s behind the coordinator "
            f"({ntp[ntp_synced]})",
            "set the time (sudo timedatectl set-ntp true): task deadlines are absolute times",
        )
    if ntp_synced is False:
        return Check(
            "clock",
            Status.WARN,
            ntp[ntp_synced],
            "enable time synchronisation (sudo timedatectl set-ntp true)",
        )
    return ok("clock", ntp[ntp_synced])


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status is Status.FAIL for c in checks) else 0
