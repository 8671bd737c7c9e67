"""The agent's commands that do not train never import torch (under emulation on a board,
importing it costs tens of seconds), nor numpy or the MQTT client where they are not used.

Each command runs in a fresh interpreter, which then reports the modules it loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from coordinator.testbed import ENV

_RUN_AND_REPORT = """
import json, sys
sys.argv = ["takfl-agent", *json.loads(sys.argv[1])]
from edge_agent.cli import app
try:
    app()
except SystemExit as e:
    code = e.code
else:
    code = 0
roots = {name.split(".")[0] for name in sys.modules}
print(json.dumps({"code": code, "modules": sorted(roots)}))
"""


def loaded_by(*args: str) -> tuple[int, set[str]]:
    done = subprocess.run(
        [sys.executable, "-c", _RUN_AND_REPORT, json.dumps(list(args))],
        capture_output=True,
        text=True,
        env={**ENV, "COLUMNS": "200"},
        timeout=600,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report["code"], set(report["modules"])


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["profiles"],
        ["validate", "raspberry-pi-4"],
        ["validate", "no-such-profile"],
        ["doctor", "--help"],
        ["run", "--help"],
    ],
    ids=lambda a: " ".join(a),
)
def test_commands_that_do_not_train_leave_torch_alone(args: list[str]) -> None:
    code, modules = loaded_by(*args)

    assert code in (0, 2, None)
    assert "torch" not in modules
    assert "numpy" not in modules
    assert "paho" not in modules


@pytest.mark.slow
def test_doctor_probes_torch_in_a_child_process() -> None:
    # Prepare / Execute: the whole doctor (no broker) in one interpreter
    code, modules = loaded_by("doctor", "--profile", "raspberry-pi-4")

    # Assert: it ran its checks (0, or 1 on a machine short of the profile's resources)
    # and torch, numpy and the runtime stayed in the children it started
    assert code in (0, 1)
    assert "torch" not in modules
    assert "numpy" not in modules
    assert "ai_edge_litert" not in modules


@pytest.mark.slow
def test_the_probe_sees_torch_where_a_command_loads_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # run imports its training stack before it reads the (missing) secret and exits 2
    code, modules = loaded_by(
        "run",
        "--profile",
        "raspberry-pi-4",
        "--broker",
        "mqtt://127.0.0.1:1",
        "--id",
        "a",
        "--secret-file",
        str(tmp_path / "missing.secret"),
        "--demo-shard",
        "0",
    )

    assert code == 2
    assert "torch" in modules
