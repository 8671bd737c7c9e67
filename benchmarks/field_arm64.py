"""Field trial on 64-bit ARM: the agent installed as a user would, in a Debian bookworm arm64
userland (the base of 64-bit Raspberry Pi OS) run by qemu-user-static, joining a real
federation whose Mosquitto broker and coordinator run on this (x86) host.

    sudo apt-get install -y qemu-user-static debootstrap binfmt-support mosquitto
    sudo nice -n 10 .venv/bin/python benchmarks/field_arm64.py [--fresh]

Steps (each timed):
1. ``debootstrap --arch=arm64 bookworm ROOT MIRROR`` (the mirror of this machine's apt
   sources), the host's CA bundle and resolv.conf copied in, /proc, /sys and /dev mounted
   (unmounted again on every exit).
2. The project's wheel built here and copied with ``constraints.txt`` into the root's
   /root; there, with an empty environment and no pip configuration, the README's board
   command: ``python3 -m venv ~/takfl && ~/takfl/bin/pip install -c constraints.txt
   "takfl_edge-*.whl[agent]"``. Install time, venv size, CUDA packages (must be none).
3. ``takfl-agent profiles``, ``import torch`` and ``takfl-agent doctor`` timed in the root.
4. ``takfl-coordinator provision`` of a small digits federation (2 S, 1 M, 1 L agents,
   everyone every round), ``mosquitto -c`` of the generated config and ``takfl-coordinator
   serve`` on the host; every agent runs ``takfl-agent run`` inside the root on its shard
   (written as a .npz file, as a device holds its private data) to the last round.
5. Writes ``benchmarks/results/field_arm64.json`` and prints a table.

Every figure is emulation on this machine, not the speed of a board. It must run as root
(debootstrap, chroot, mounts). With ``--fresh`` the root is built again from nothing;
otherwise an existing root is reused for step 1, but the venv and pip's cache in it are
always removed first, so the install is measured from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coordinator.broker.net import free_port, wait_port  # noqa: E402
from coordinator.store import RunStore  # noqa: E402
from takfl.config import load_federation  # noqa: E402
from takfl.federation_data import build_federation_data, client_id  # noqa: E402

DEFAULT_ROOT = Path("/var/tmp/takfl-field-arm64/root")
SUITE = "bookworm"
FLEET = "field-arm64"
CLIENTS = {"S": 2, "M": 1, "L": 1}  # every prototype of the digits federation
# Board profiles per prototype: the digits federation's S tier is a phone that trains
# through ExecuTorch, which the board install (the agent extra) does not include.
BOARD_PROFILES = {"S": "raspberry-pi-4", "M": "raspberry-pi-5", "L": "workstation"}
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
def mounted(root: Path):  # type: ignore[no-untyped-def]
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


def write_federation(work: Path, rounds: int) -> Path:
    """The digits federation with CLIENTS agents, everyone sampled every round."""
    cfg = load_federation("digits").model_dump(mode="json")
    cfg["name"] = FLEET
    cfg["rounds"] = rounds
    for proto in cfg["prototypes"]:
        proto["clients"] = CLIENTS[proto["name"]]
        proto["profile"] = BOARD_PROFILES[proto["name"]]
        proto["sample_rate"] = 1.0
    cfg["algorithm"]["distill"]["steps"] = 30
    path = work / f"{FLEET}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def federation(root: Path, work: Path, rounds: int) -> dict[str, Any]:
    """Mosquitto and the coordinator here, the agents inside the root, to the last round."""
    cfg_path = write_federation(work, rounds)
    cfg = load_federation(cfg_path)
    port = free_port()
    py = sys.executable
    run(
        [
            py,
            "-m",
            "coordinator.cli",
            "provision",
            "--config",
            str(cfg_path),
            "--out",
            str(work / "fleet"),
            "--mosquitto-port",
            str(port),
            "--mosquitto-user",
            "root",
        ],
        cwd=REPO,
    )
    fleet = work / "fleet"
    board_dir = root / "root" / "trial"
    shutil.rmtree(board_dir, ignore_errors=True)
    (board_dir / "data").mkdir(parents=True)
    data = build_federation_data(cfg, 0)
    agents = []
    for proto in cfg.prototypes:
        for k in range(proto.clients):
            cid = client_id(proto.name, k)
            _, x, y = data.clients[cid]
            np.savez(board_dir / "data" / f"{cid}.npz", x=x.numpy(), y=y.numpy())
            shutil.copy2(fleet / "secrets" / f"{cid}.secret", board_dir / f"{cid}.secret")
            os.chmod(board_dir / f"{cid}.secret", 0o600)
            agents.append((cid, proto.profile, len(y)))
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        with open(logs / f"{name}.log", "wb") as out:
            procs[name] = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env
            )

    broker_agents = f"mqtt://127.0.0.1:{port}"
    env_host = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    try:
        spawn("mosquitto", ["mosquitto", "-c", str(fleet / "mosquitto" / "mosquitto.conf")])
        if not wait_port("127.0.0.1", port, 15):
            raise RuntimeError(f"mosquitto did not open port {port}: see {logs}/mosquitto.log")
        spawn(
            "coordinator",
            [
                py,
                "-m",
                "coordinator.cli",
                "serve",
                "--config",
                str(cfg_path),
                "--broker",
                f"mqtt://takfl-coordinator@127.0.0.1:{port}",
                "--password-file",
                str(fleet / "coordinator.password"),
                "--run-dir",
                str(work / "run"),
                "--agents",
                str(fleet / "agents.json"),
                "--device",
                "cpu",
                "--no-export",
                "--deadline",
                "3600",
                "--wait-all",
                "3600",
                "--max-wait",
                "3600",
            ],
            env=env_host,
        )
        doctor = subprocess.run(
            chroot_cmd(
                root,
                f"{VENV}/bin/takfl-agent",
                "doctor",
                "--profile",
                agents[0][1],
                "--broker",
                broker_agents,
                "--id",
                agents[0][0],
                "--secret-file",
                f"{BOARD_HOME}/trial/{agents[0][0]}.secret",
                "--fleet",
                FLEET,
                "--wait",
                "600",
                env={"COLUMNS": "160"},
            ),
            capture_output=True,
            text=True,
        )
        # the preflight a user runs first, on the first agent's board, with the coordinator up
        (logs / "doctor.log").write_text(doctor.stdout + doctor.stderr)
        log(f"doctor in the root exited {doctor.returncode} (log: {logs}/doctor.log)")
        for cid, profile, _ in agents:
            spawn(
                cid,
                chroot_cmd(
                    root,
                    f"{VENV}/bin/takfl-agent",
                    "run",
                    "--profile",
                    profile,
                    "--broker",
                    broker_agents,
                    "--id",
                    cid,
                    "--secret-file",
                    f"{BOARD_HOME}/trial/{cid}.secret",
                    "--data",
                    f"{BOARD_HOME}/trial/data/{cid}.npz",
                    "--fleet",
                    FLEET,
                    "--threads",
                    "1",
                    "--max-tasks",
                    str(rounds),
                    env={"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
                ),
            )
        coordinator = procs["coordinator"]
        while coordinator.poll() is None:
            dead = [n for n, p in procs.items() if n != "coordinator" and p.poll() not in (None, 0)]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} failed: see the logs in {logs}")
            time.sleep(2)
        if coordinator.returncode != 0:
            raise RuntimeError(f"the coordinator exited {coordinator.returncode}: {logs}")
        wall_s = time.monotonic() - start
        for cid, _, _ in agents:
            procs[cid].wait(600)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
    state = RunStore(work / "run").read_state()
    per_agent = agent_figures(work / "run", agents)
    missing = [a["agent"] for a in per_agent if a["rounds"] < rounds]
    if state.get("round") != rounds or missing:
        lacking = f"; not every round has an update from {', '.join(missing)}" if missing else ""
        raise RuntimeError(
            f"the federation stopped at round {state.get('round')} of {rounds}{lacking}: see {logs}"
        )
    return {
        "rounds": rounds,
        "rounds_completed": state.get("round"),
        "wall_s": round(wall_s, 1),
        "accuracy": state.get("accuracy"),
        "doctor_exit": doctor.returncode,
        "agents": per_agent,
    }


def agent_figures(run_dir: Path, agents: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
    """Per agent, from the run's telemetry log (``RUN/telemetry.jsonl``; its ``update``
    records hold the accepted update's size and the agent's report): train seconds and
    update bytes per round, the codec, and the highest peak RSS."""
    updates: dict[str, list[dict[str, Any]]] = {cid: [] for cid, _, _ in agents}
    for rec in RunStore(run_dir).telemetry():
        if rec.get("kind") == "update" and rec.get("agent_id") in updates:
            updates[rec["agent_id"]].append(rec)
    out = []
    for cid, profile, samples in agents:
        recs = sorted(updates[cid], key=lambda r: r["round"])
        tel = [r.get("telemetry") or {} for r in recs]
        rss = [t["peak_rss_mb"] for t in tel if t.get("peak_rss_mb") is not None]
        out.append(
            {
                "agent": cid,
                "profile": profile,
                "samples": samples,
                "rounds": len(recs),
                "train_s": [round(t["train_s"], 1) for t in tel if t.get("train_s") is not None],
                "update_bytes": [r["upload_bytes"] for r in recs],
                "compression": recs[-1]["compression"] if recs else None,
                "peak_rss_mb": round(max(rss), 1) if rss else None,
            }
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--work", type=Path, default=DEFAULT_ROOT.parent / "work")
    parser.add_argument("--fresh", action="store_true", help="debootstrap the root again")
    parser.add_argument("--mirror", default=None, help="Debian mirror (default: apt sources)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/field_arm64.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (debootstrap, chroot and mounts need it)", file=sys.stderr)
        return 2
    for tool in ("debootstrap", "mosquitto", "chroot"):
        if shutil.which(tool) is None:
            print(
                f"{tool} not found: apt-get install -y qemu-user-static debootstrap "
                "binfmt-support mosquitto",
                file=sys.stderr,
            )
            return 2
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        print(
            "no binfmt handler for arm64: apt-get install -y qemu-user-static binfmt-support"
            " (then update-binfmts --enable qemu-aarch64)",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the mounts come off
    mirror = args.mirror or apt_mirror()
    result: dict[str, Any] = {
        "machine": "x86_64 host, 2 cores shared; arm64 userland under qemu-user-static",
        "emulated": True,
        "suite": SUITE,
        "mirror": mirror,
        "clients": CLIENTS,
    }
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log(f"root {args.root} ({'fresh' if args.fresh else 'reused if complete'}), mirror {mirror}")
    result["debootstrap_s"] = build_root(args.root, mirror, args.fresh)
    with ExitStack() as stack:
        stack.enter_context(mounted(args.root))
        dist = work / "dist"
        dist.mkdir()
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "--wheel-dir",
                str(dist),
                str(REPO),
            ],
            cwd=work,
        )
        (wheel,) = dist.glob("takfl_edge-*.whl")
        result["install"] = install_agent(args.root, wheel)
        if result["install"]["cuda_packages"]:
            raise RuntimeError(f"CUDA packages installed: {result['install']['cuda_packages']}")
        result["probe"] = probe_root(args.root)
        result["federation"] = federation(args.root, work, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    log(f"wrote {args.out}")
    return 0


def print_table(r: dict[str, Any]) -> None:
    inst, probe, fed = r["install"], r["probe"], r["federation"]
    print(
        f"\narm64 field trial (qemu emulation on x86, not board speed); {probe['machine']} "
        f"Python {probe['python']} glibc {probe['glibc']}, torch {inst['torch']}"
    )
    cuda = inst["cuda_packages"] or "none"
    print(
        f"install {inst['install_s']} s, venv {inst['venv_mb']} MB, "
        f"{inst['packages']} packages, CUDA packages: {cuda}"
    )
    print(
        f"takfl-agent profiles {probe['profiles_s']} s, import torch {probe['import_torch_s']} s,"
        f" import agent {probe['import_agent_s']} s"
    )
    print(
        f"{'agent':6} {'profile':16} {'rounds':>6} {'train s/round':>14} "
        f"{'bytes/round':>12} {'peak RSS MB':>12}"
    )
    for a in fed["agents"]:
        train = "/".join(f"{t:.1f}" for t in a["train_s"])
        sent = "/".join(str(b) for b in a["update_bytes"])
        print(
            f"{a['agent']:6} {a['profile']:16} {a['rounds']:>6} {train:>14} {sent:>12} "
            f"{a['peak_rss_mb']:>12}"
        )
    print(
        f"rounds {fed['rounds_completed']}/{fed['rounds']} in {fed['wall_s']} s; "
        f"test accuracy {fed['accuracy']}"
    )


if __name__ == "__main__":
    sys.exit(main())
