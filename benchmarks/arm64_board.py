"""An emulated 64-bit ARM board for the field trial (benchmarks/field_arm64.py): a Debian
bookworm arm64 userland (the base of 64-bit Raspberry Pi OS) built by debootstrap and run
by qemu-user-static through chroot, the agent installed in it with the README's board
command, and its start-up costs measured. Everything here needs root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def unmount_all(root: Path) -> None:
    for _, sub, _ in reversed(MOUNTS):
        target = root / sub
        if os.path.ismount(target):
            subprocess.run(["umount", "-l", str(target)], check=False)


@contextmanager
def mounted(root: Path) -> Iterator[None]:
    """/proc, /sys and /dev inside the root for as long as the block runs."""
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
        yield
    finally:
        unmount_all(root)


def chroot_cmd(root: Path, *argv: str, env: dict[str, str] | None = None) -> list[str]:
    """A command run inside the root with a board user's clean environment (no PIP_*
    settings, no pip config from this machine)."""
    base = {"HOME": BOARD_HOME, "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
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
    ):
        start = time.monotonic()
        in_root(root, script)
        out[name] = round(time.monotonic() - start, 1)
    return out
