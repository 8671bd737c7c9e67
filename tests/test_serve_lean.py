"""The inference service never imports torch: neither ``takfl-agent serve`` (its help,
or the command up to reading its files) nor the modules that install and serve."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from coordinator.testbed import ENV
from tests.test_agent_lean import loaded_by

SERVING_MODULES = [
    "edge_agent.serve_command",
    "edge_agent.deploy.service",
    "edge_agent.deploy.deployment",
    "edge_agent.deploy.installer",
    "edge_agent.deploy.checks",
    "edge_agent.deploy.decision",
    "edge_agent.deploy.channel",
    "edge_agent.deploy.health",
    "edge_agent.deploy.slots",
    "edge_agent.serving.server",
    "edge_agent.serving.app",
    "edge_agent.serving.model",
    "edge_agent.serving.stats",
]


def test_serve_help_leaves_torch_numpy_and_paho_alone() -> None:
    code, modules = loaded_by("serve", "--help")

    assert code in (0, None)
    assert not {"torch", "numpy", "paho"} & modules


def test_serve_loads_its_whole_stack_without_torch(tmp_path: Path) -> None:
    # Prepare / Execute: every import of the command runs before the (missing) secret
    # file is read and the command exits 2
    code, modules = loaded_by(
        "serve",
        "--profile",
        "jetson-orin-nano",
        "--broker",
        "mqtt://127.0.0.1:1",
        "--id",
        "a1",
        "--secret-file",
        str(tmp_path / "missing.secret"),
        "--release-root",
        str(tmp_path / "root.json"),
        "--state-dir",
        str(tmp_path / "state"),
    )
    # Assert: it got as far as the MQTT client and the release metadata, not torch
    assert code == 2
    assert {"paho", "tuf"} <= modules
    assert "torch" not in modules


def test_the_install_and_serving_modules_import_no_torch() -> None:
    script = (
        "import importlib, json, sys\n"
        f"for m in {SERVING_MODULES!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=300
    )

    assert done.returncode == 0, done.stderr
    modules = set(json.loads(done.stdout.splitlines()[-1]))
    assert "onnxruntime" not in modules  # loaded with the first model, not at import
    assert "torch" not in modules
