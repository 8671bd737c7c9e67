"""Resolve ``takfl-edge[agent]`` with ``constraints.txt`` for every supported install target.

Builds the wheel, then asks the package registry (as a user's board would: none of this
machine's pip configuration, local wheel folders or caps) what ``pip install`` would
install, with ``pip install --dry-run --report --only-binary=:all: --platform ...
--python-version ...`` per target. Every target runs in its own pip process, in parallel.

pip evaluates environment markers (in the constraints file and in every package's metadata)
against the interpreter that runs it, not against ``--platform``/``--python-version``
(pypa/pip#11664). So each pip process is started with the target's marker environment
(``platform_machine``, ``python_version``, ``platform_release``) substituted for its own;
otherwise an x86 host would resolve the aarch64 lines of the constraints wrongly and pull the
CUDA packages torch's metadata names for x86_64.

Run by hand: ``python -m tests.install_targets`` (prints a table, exits 1 on a problem).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"
# Packages that only a CUDA build brings; none may reach a board without an NVIDIA GPU.
CUDA_PREFIXES = ("nvidia-", "cuda-", "triton")


@dataclass(frozen=True, kw_only=True)
class Target:
    """One platform a user installs the agent on."""

    name: str
    machine: str  # platform_machine
    python: str  # "3.10"
    glibc: tuple[int, int]  # of the distribution, bounds the manylinux tags it accepts
    release: str  # platform_release (uname -r) of such a system
    board: bool  # True: no CUDA package may be resolved

    def platforms(self) -> list[str]:
        """Every wheel platform tag the target accepts, newest first (pip does not expand
        one manylinux tag into the older ones it implies)."""
        major, minor = self.glibc
        tags = [f"manylinux_{major}_{m}_{self.machine}" for m in range(minor, 16, -1)]
        return [*tags, f"manylinux2014_{self.machine}", f"linux_{self.machine}"]

    def markers(self) -> dict[str, str]:
        return {
            "platform_machine": self.machine,
            "python_version": self.python,
            "python_full_version": f"{self.python}.0",
            "implementation_version": f"{self.python}.0",
            "platform_release": self.release,
        }


TARGETS = (
    Target(
        # Ubuntu 22.04 (JetPack 6's userland and Python) on a board that takes torch from
        # the constraints; a Jetson itself keeps NVIDIA's torch (no pin, see constraints.txt)
        name="ubuntu22.04-arm64-py3.10",
        machine="aarch64",
        python="3.10",
        glibc=(2, 35),
        release="5.15.0-1040-raspi",
        board=True,
    ),
    Target(
        name="pi-os-bookworm-py3.11",
        machine="aarch64",
        python="3.11",
        glibc=(2, 36),
        release="6.1.0-rpi7-rpi-v8",
        board=True,
    ),
    Target(
        name="ubuntu24.04-arm64-py3.12",
        machine="aarch64",
        python="3.12",
        glibc=(2, 39),
        release="6.8.0-1004-raspi",
        board=True,
    ),
    Target(
        name="workstation-x86_64-py3.11",
        machine="x86_64",
        python="3.11",
        glibc=(2, 36),
        release="6.1.0-18-amd64",
        board=False,
    ),
)

# Run in the child pip: substitute the target's marker environment, then run pip's CLI.
_PIP_WITH_MARKERS = """
import json, sys
import pip._vendor.packaging.markers as markers
overrides = json.loads(sys.argv[1])
host = markers.default_environment
def target_environment():
    env = host()
    env.update(overrides)
    return env
markers.default_environment = target_environment
from pip._internal.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@dataclass(kw_only=True)
class Resolution:
    """What pip would install for one target, or why it cannot."""

    target: Target
    returncode: int
    installs: dict[str, str] = field(default_factory=dict)  # name -> version
    error: str = ""

    def problems(self) -> list[str]:
        return resolution_problems(self.target, self.returncode, self.installs, self.error)


def resolution_problems(
    target: Target, returncode: int, installs: dict[str, str], error: str
) -> list[str]:
    """Every problem of one target's resolution (empty: fine)."""
    if returncode != 0:
        return [f"{target.name}: pip cannot resolve: {error.strip()[-1500:]}"]
    problems = []
    if "torch" not in installs:
        problems.append(f"{target.name}: torch is not in the resolution")
    if target.board:
        cuda = sorted(n for n in installs if n.startswith(CUDA_PREFIXES))
        if cuda:
            problems.append(f"{target.name}: CUDA packages for a board: {', '.join(cuda)}")
    return problems


def isolated_pip_env() -> dict[str, str]:
    """The environment a stock pip runs in: no config file, no PIP_* settings from this
    machine (local wheel folders, version caps), only the CA bundle kept for TLS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    cert = os.environ.get("PIP_CERT")
    if cert:
        env["PIP_CERT"] = cert
    return env


def build_wheel(out: Path) -> Path:
    """Build the project's wheel into ``out`` and return its path."""
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*cmd, "--wheel-dir", str(out), str(REPO)],
        check=True,
        capture_output=True,
        env=isolated_pip_env(),
        cwd=out,
    )
    (wheel,) = out.glob("takfl_edge-*.whl")
    return wheel


def resolve(target: Target, wheel: Path, work: Path, timeout_s: float = 600) -> Resolution:
    """``pip install --dry-run --report`` of the wheel's ``[agent]`` extra for ``target``."""
    report = work / f"{target.name}.json"
    cmd = [sys.executable, "-c", _PIP_WITH_MARKERS, json.dumps(target.markers())]
    cmd += ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report)]
    cmd += ["--only-binary=:all:", "--implementation", "cp", "--python-version", target.python]
    for tag in target.platforms():
        cmd += ["--platform", tag]
    cmd += ["-c", str(CONSTRAINTS), f"takfl-edge[agent] @ {wheel.as_uri()}"]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env=isolated_pip_env(), timeout=timeout_s
    )
    installs: dict[str, str] = {}
    if done.returncode == 0:
        for item in json.loads(report.read_text())["install"]:
            meta = item["metadata"]
            installs[meta["name"].lower().replace("_", "-")] = meta["version"]
    return Resolution(
        target=target, returncode=done.returncode, installs=installs, error=done.stderr
    )


def resolve_all(targets: tuple[Target, ...] = TARGETS) -> list[Resolution]:
    """Build the wheel once, resolve every target in parallel."""
    with tempfile.TemporaryDirectory(prefix="takfl-resolve-") as tmp:
        work = Path(tmp)
        wheel = build_wheel(work)
        with ThreadPoolExecutor(max_workers=len(targets)) as pool:
            return list(pool.map(lambda t: resolve(t, wheel, work), targets))


def main() -> int:
    results = resolve_all()
    print(f"{'target':28} {'torch':10} {'numpy':8} {'packages':>8}  problems")
    failed = False
    for r in results:
        problems = r.problems()
        failed |= bool(problems)
        print(
            f"{r.target.name:28} {r.installs.get('torch', '-'):10} "
            f"{r.installs.get('numpy', '-'):8} {len(r.installs):>8}  {len(problems)}"
        )
        for p in problems:
            print(f"  {p}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
