"""The agent installs from the package registry on every supported board without CUDA.

``test_agent_resolves_on_every_target`` asks the real package registry (PyPI; CI has it)
through pip's own resolver; see ``tests/install_targets.py``. The other tests check the
constraints file's markers and the problem detection without a network.
"""

from __future__ import annotations

import re

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from tests.install_targets import CONSTRAINTS, TARGETS, Target, resolution_problems, resolve_all

PI = next(t for t in TARGETS if t.name.startswith("pi-os"))
JETSON = Target(
    name="jetson-orin-jetpack6",
    machine="aarch64",
    python="3.10",
    glibc=(2, 35),
    release="5.15.148-tegra",
    board=True,
)


def pins_for(target: Target) -> dict[str, str]:
    """name -> pinned version of every constraints line whose marker holds on ``target``;
    a package pinned twice for one target is an error."""
    env = {**default_environment(), **target.markers()}
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        (spec,) = req.specifier
        if req.name in pins:
            raise ValueError(f"{req.name} is pinned twice for {target.name}")
        pins[req.name] = spec.version
    return pins


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_agent_resolves_on_every_target() -> None:
    # Prepare / Execute: pip's real resolver against the registry, one process per target
    results = resolve_all()

    # Assert: every target resolves, boards get no CUDA package, and each gets the torch
    # and numpy the constraints pin for it
    problems = [p for r in results for p in r.problems()]
    assert problems == []
    for r in results:
        pins = pins_for(r.target)
        assert r.installs["torch"] == pins["torch"], r.target.name
        assert r.installs["numpy"] == pins["numpy"], r.target.name
        assert r.installs["paho-mqtt"] == pins["paho-mqtt"], r.target.name
    by_name = {r.target.name: r for r in results}
    assert by_name[PI.name].installs["torch"] == "2.10.0"


def test_constraints_pick_per_platform_and_python() -> None:
    workstation = next(t for t in TARGETS if not t.board)
    py310 = next(t for t in TARGETS if t.python == "3.10")

    assert pins_for(workstation)["torch"] == "2.13.0"
    assert pins_for(PI)["torch"] == "2.10.0"
    assert pins_for(PI)["numpy"] == "2.4.6"
    assert pins_for(py310)["numpy"] == "2.2.6"
    # every target sees each package pinned at most once (pins_for raises otherwise)
    for target in (*TARGETS, JETSON):
        assert "paho-mqtt" in pins_for(target)


def test_constraints_leave_nvidia_torch_on_jetson() -> None:
    pins = pins_for(JETSON)

    assert "torch" not in pins  # NVIDIA's wheel for the JetPack, installed first, stays
    assert pins["numpy"] == "2.2.6"


@pytest.mark.parametrize(
    ("target", "installs", "returncode", "expected"),
    [
        (PI, {"torch": "2.10.0", "numpy": "2.4.6"}, 0, []),
        (PI, {"torch": "2.13.0", "nvidia-cublas": "13.1", "triton": "3.7"}, 0, ["CUDA"]),
        (PI, {"torch": "2.13.0", "cuda-bindings": "13.0"}, 0, ["CUDA"]),
        (PI, {}, 1, ["cannot resolve"]),
        (PI, {"numpy": "2.4.6"}, 0, ["torch is not"]),
    ],
)
def test_problems_are_detected(
    target: Target, installs: dict[str, str], returncode: int, expected: list[str]
) -> None:
    problems = resolution_problems(target, returncode, installs, "ResolutionImpossible")

    assert len(problems) == len(expected)
    for problem, word in zip(problems, expected, strict=True):
        assert re.search(word, problem)


def test_cuda_packages_are_fine_on_the_workstation() -> None:
    workstation = next(t for t in TARGETS if not t.board)

    assert resolution_problems(workstation, 0, {"torch": "2.13.0", "triton": "3.7"}, "") == []
