"""An emulated 64-bit ARM board for the field trial (benchmarks/field_arm64.py): a Debian
bookworm arm64 userland (the base of 64-bit Raspberry Pi OS) built by debootstrap and run
by qemu-user-static through chroot, the agent installed in it from the project's wheel with
the README's board command, and its start-up costs measured. Everything here needs root
(:func:`missing_prerequisite` says what this machine lacks).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from takfl.config import load_profile
from takfl.config.loader import resolve

REPO = Path(__file__).resolve().parents[1]
SUITE = "bookworm"
BOARD_HOME = "/root"  # the board user's home inside the root
VENV = f"{BOARD_HOME}/takfl"
CUDA_PREFIXES = ("nvidia-", "cuda-", "triton")
# The README's board command, run in the board user's home holding the wheel and constraints
BOARD_COMMAND = (
    'python3 -m venv ~/takfl && ~/takfl/bin/pip install -c constraints.txt "{wheel}[agent]"'
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def apt_mirror() -> str:
    """The first Debian mirror named in this machine's apt sources (one-line or deb822)."""
    paths = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in paths:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            m = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line) or re.match(
                r"URIs:\s*(\S+)", line
            )
            if m and "/debian" in m.group(1) and "security" not in m.group(1):
                return m.group(1)
    return "http://deb.debian.org/debian"


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, check=True, text=True, **kw)


def timed(cmd: list[str], **kw: Any) -> float:
    start = time.monotonic()
    run(cmd, **kw)
    return time.monotonic() - start


def build_root(root: Path, mirror: str, fresh: bool) -> float | None:
    """debootstrap the arm64 root unless a finished one is there; seconds it took or None."""
    done = root / ".takfl-root-complete"
    if fresh and root.exists():
        unmount_all(root)
        shutil.rmtree(root)
    if done.exists():
        return None
    if root.exists():  # an interrupted build
        unmount_all(root)
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    seconds = timed(
        [
            "debootstrap",
            "--arch=arm64",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            SUITE,
            str(root),
            mirror,
        ]
    )
    done.write_text(f"{SUITE} {mirror}\n")
    return seconds


MOUNTS = (("proc", "proc", "proc"), ("sysfs", "sys", "sysfs"), ("/dev", "dev", None))


# The board's CPU: a Cortex-A76 (Raspberry Pi 5), in qemu (QEMU_CPU) and in /proc/cpuinfo.
# - qemu-user's default CPU ("max") offers extensions no Pi has, and under qemu 7.2 (Debian
#   bookworm's) XNNPACK's int8 kernels picked for them compute wrong results (LiteRT int8
#   outputs unrelated to the same model's on x86; right on cortex-a72 or cortex-a76).
# - A Cortex-A72 (Raspberry Pi 4, ARMv8.0) cannot import the aarch64 torch 2.10.0 wheel:
#   SIGILL, as on the board (LSE atomics in libc10, pytorch/pytorch#174344).
# - qemu-user 7.2 shows a guest the host's /proc/cpuinfo: x86 text, which the cpuinfo
#   library inside LiteRT's XNNPACK and inside onnxruntime cannot read as an arm64 CPU's,
#   and crashes on (SIGSEGV creating a LiteRT interpreter, importing onnxruntime). The board
#   shows what a Pi 5 shows instead, one entry per CPU of this machine.
BOARD_CPU = "cortex-a76"
CPUINFO = "proc/cpuinfo"
BOARD_CPUINFO = "run/takfl-board-cpuinfo"  # in the root, bound onto its /proc/cpuinfo
CORTEX_A76 = (
    "processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 "
    "crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\n"
    "CPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n"
)


def board_cpuinfo(cpus: int) -> str:
    """/proc/cpuinfo of a Cortex-A76 board with ``cpus`` processors."""
    if cpus < 1:
        raise ValueError(f"a board has at least one CPU, not {cpus}")
    return "\n".join(CORTEX_A76.format(n=n) for n in range(cpus))


def unmount_all(root: Path) -> None:
    if os.path.ismount(root / CPUINFO):
        subprocess.run(["umount", "-l", str(root / CPUINFO)], check=False)
    for _, sub, _ in reversed(MOUNTS):
        target = root / sub
        if os.path.ismount(target):
            subprocess.run(["umount", "-l", str(target)], check=False)


@contextmanager
def mounted(root: Path) -> Iterator[None]:
    """/proc, /sys and /dev inside the root for as long as the block runs, and an arm64
    /proc/cpuinfo (:func:`board_cpuinfo`, as many CPUs as this machine has) over the
    host's."""
    try:
        for source, sub, fstype in MOUNTS:
            target = root / sub
            target.mkdir(exist_ok=True)
            if os.path.ismount(target):
                continue
            if fstype is None:
                run(["mount", "--bind", source, str(target)])
            else:
                run(["mount", "-t", fstype, source, str(target)])
        cpuinfo = root / BOARD_CPUINFO
        cpuinfo.parent.mkdir(exist_ok=True)
        cpuinfo.write_text(board_cpuinfo(os.cpu_count() or 1))
        if not os.path.ismount(root / CPUINFO):
            run(["mount", "--bind", str(cpuinfo), str(root / CPUINFO)])
        yield
    finally:
        unmount_all(root)


def chroot_cmd(root: Path, *argv: str, env: dict[str, str] | None = None) -> list[str]:
    """A command run inside the root with a board user's clean environment (no PIP_*
    settings, no pip config from this machine), on the board's CPU (:data:`BOARD_CPU`)."""
    base = {
        "HOME": BOARD_HOME,
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "QEMU_CPU": BOARD_CPU,  # read by qemu-user, not by the board's programs
    }
    pairs = [f"{k}={v}" for k, v in {**base, **(env or {})}.items()]
    return ["chroot", str(root), "/usr/bin/env", "-i", *pairs, *argv]


def in_root(root: Path, script: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return run(chroot_cmd(root, "/bin/sh", "-c", f"cd {BOARD_HOME} && {script}"), **kw)


def install_agent(root: Path, wheel: Path) -> dict[str, Any]:
    """The README's board command inside the root, from scratch."""
    home = root / BOARD_HOME.lstrip("/")
    for stale in (home / "takfl", home / ".cache" / "pip"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in home.glob("takfl_edge-*.whl"):
        old.unlink()
    shutil.copy2(wheel, home / wheel.name)
    shutil.copy2(REPO / "constraints.txt", home / "constraints.txt")
    # pip inside the root trusts what this machine trusts (a proxy's CA included)
    shutil.copy2("/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/certs/ca-certificates.crt")
    shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
    board_command = BOARD_COMMAND.format(wheel=wheel.name)
    start = time.monotonic()
    in_root(root, board_command)
    install_s = time.monotonic() - start
    frozen = in_root(root, "~/takfl/bin/pip freeze", capture_output=True).stdout.split()
    du = run(["du", "-sm", str(home / "takfl")], capture_output=True).stdout.split()[0]
    versions = dict(line.split("==", 1) for line in frozen if "==" in line)
    return {
        "board_command": board_command,
        "install_s": round(install_s, 1),
        "venv_mb": int(du),
        "packages": len(versions),
        "torch": versions.get("torch"),
        "numpy": versions.get("numpy"),
        "cuda_packages": sorted(n for n in versions if n.lower().startswith(CUDA_PREFIXES)),
    }


def probe_root(root: Path, broker: str | None = None) -> dict[str, Any]:
    """Platform and start-up costs inside the root."""
    out: dict[str, Any] = {}
    probe = in_root(
        root,
        "uname -m && ~/takfl/bin/python -c 'import platform, sys; "
        "print(platform.machine(), sys.version.split()[0], platform.libc_ver()[1])'",
        capture_output=True,
    ).stdout.split()
    out["uname_m"], out["machine"], out["python"], out["glibc"] = probe[:4]
    for name, script in (
        ("profiles_s", "~/takfl/bin/takfl-agent profiles > /dev/null"),
        ("import_torch_s", "~/takfl/bin/python -c 'import torch'"),
        ("import_agent_s", "~/takfl/bin/python -c 'import edge_agent.runner'"),
        ("import_onnxruntime_s", "~/takfl/bin/python -c 'import onnxruntime'"),
        ("import_litert_s", "~/takfl/bin/python -c 'import ai_edge_litert.interpreter'"),
    ):
        start = time.monotonic()
        in_root(root, script)
        out[name] = round(time.monotonic() - start, 1)
    return out


def missing_prerequisite() -> str | None:
    """Why this machine cannot run the trial (root, tools, arm64 binfmt); None if it can."""
    if os.geteuid() != 0:
        return "run as root (debootstrap, chroot and mounts need it)"
    for tool in ("debootstrap", "mosquitto", "chroot"):
        if shutil.which(tool) is None:
            return (
                f"{tool} not found: apt-get install -y qemu-user-static debootstrap "
                "binfmt-support mosquitto"
            )
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        return (
            "no binfmt handler for arm64: apt-get install -y qemu-user-static binfmt-support"
            " (then update-binfmts --enable qemu-aarch64)"
        )
    return None


def build_wheel(work: Path) -> Path:
    """The project's wheel, built here into ``work/dist``."""
    dist = work / "dist"
    dist.mkdir()
    run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"),
            *("--wheel-dir", str(dist), str(REPO)),
        ],
        cwd=work,
    )
    (wheel,) = dist.glob("takfl_edge-*.whl")
    return wheel


# The emulated agents' device profiles: the bundled ones, with inference on one thread (as
# the trial trains on one: four agents share this machine's cores) and the health check's
# latency budget scaled for emulation, which runs arm64 code about an order of magnitude
# slower than a board (the parity check is unchanged).
EMULATED_INFERENCE_THREADS = 1
LATENCY_BUDGET_FACTOR = 10.0
PROFILES_DIR = "trial/profiles"  # under the board user's home


def emulated_profile(raw: dict[str, Any]) -> dict[str, Any]:
    """A device profile (its YAML as a dict) for an emulated agent: a copy with
    EMULATED_INFERENCE_THREADS inference threads and the latency budget (when it has one)
    times LATENCY_BUDGET_FACTOR."""
    inference = dict(raw.get("inference") or {})
    inference["threads"] = EMULATED_INFERENCE_THREADS
    if inference.get("latency_budget_ms") is not None:
        inference["latency_budget_ms"] = inference["latency_budget_ms"] * LATENCY_BUDGET_FACTOR
    return {**raw, "inference": inference}


def stage_profiles(root: Path, names: list[str]) -> dict[str, float | None]:
    """The emulated profile of each bundled profile in ``names``, written (and checked to
    load) to ``~/trial/profiles/<name>.yaml`` in the root; name -> its latency budget."""
    folder = root / BOARD_HOME.lstrip("/") / PROFILES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    budgets = {}
    for name in names:
        path = folder / f"{name}.yaml"
        path.write_text(
            yaml.safe_dump(emulated_profile(yaml.safe_load(resolve(name, "devices").read_text())))
        )
        budgets[name] = load_profile(path).inference.latency_budget_ms
    return budgets


def board_profile(name: str) -> str:
    """The path, inside the root, of profile ``name``'s emulated copy."""
    return f"{BOARD_HOME}/{PROFILES_DIR}/{name}.yaml"
