"""SIGKILL at every write of an install leaves a working active model: the release
served before, or the new one whole, never a mix; and the same offer afterwards
completes the install. Each case is a child process killed at one write
(``tests/deploy_crash.py``)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner

from coordinator.testbed import ENV
from takfl.release.keys import generate_release_key, load_root, load_signer
from takfl.wire.messages import encode_message
from takfl.wire.signing import generate_secret
from tests.release_fixtures import (
    build,
    feed,
    installer,
    normalise,
    offer,
    onnx_model,
    run_onnx,
    samples,
)

REPO = Path(__file__).resolve().parent.parent
SECRET = generate_secret()
MODEL_2 = "S-round-2-fp32.onnx"

# (point, installed before the crash?, release served after a restart)
CASES = [
    ("after:trusted.json", True, 1),  # metadata verified, nothing fetched yet
    (f"before:{MODEL_2}", True, 1),  # mid-download: a torn write of the model
    (f"after:{MODEL_2}", True, 1),  # mid-download: the model stored, not the reference
    ("after:reference.safetensors", True, 1),
    ("after:metadata.json", True, 1),  # every file stored, not yet checked
    ("before:active.json", True, 1),  # mid-switch: before the rename
    ("after:active.json", True, 2),  # mid-switch: right after the rename
    ("none", True, 2),
    (f"after:{MODEL_2}", False, None),  # a first install: nothing to serve yet
    ("after:active.json", False, 2),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Release key and root, releases 1 and 2, and the crash child's fixture folder."""
    folder = tmp_path_factory.mktemp("fixtures")
    _, root_path = generate_release_key(folder)
    signer: CryptoSigner = load_signer(folder / "release-key.pem")
    models = {1: onnx_model(1), 2: onnx_model(2)}
    releases = {v: build(signer, v, models[v]) for v in (1, 2)}
    (folder / "offer.json").write_bytes(encode_message(offer(releases[2], SECRET)))
    (folder / "blobs").mkdir()
    for digest, data in releases[2].blobs.items():
        (folder / "blobs" / digest).write_bytes(data)
    return {"folder": folder, "root": load_root(root_path), "models": models, "releases": releases}


@pytest.mark.parametrize(("point", "upgrade", "served"), CASES)
def test_a_device_killed_during_an_install_serves_a_whole_release(
    world: dict[str, Any],
    tmp_path: Path,
    point: str,
    upgrade: bool,
    served: int | None,
) -> None:
    # Prepare: release 1 installed (unless a first install)
    state, root = tmp_path / "state", world["root"]
    one = world["releases"][1]
    if upgrade:
        assert feed(installer(state, root), offer(one, SECRET), one.blobs)[-1].state == "installed"
    # Execute: the child installs release 2 and is killed at ``point``
    done = subprocess.run(
        [sys.executable, "-m", "tests.deploy_crash", str(world["folder"]), str(state), point],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Assert: killed where asked; a restart serves a whole release
    if point == "none":
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[-1])[-1] == "installed"
    else:
        assert done.returncode == -signal.SIGKILL, done.stderr
    restarted = installer(state, root)
    model = restarted.holder.get()
    if served is None:
        assert model is None
    else:
        assert model is not None and model.version == served
        x = normalise(samples(4, seed=5))
        expected = run_onnx(world["models"][served], x)
        np.testing.assert_allclose(model.predict(x), expected, rtol=1e-5, atol=1e-5)
    assert not [p for p in state.rglob(".*") if p.is_file()]  # no temp file left
    # ...and the coordinator's offer, repeated, completes the install
    two = world["releases"][2]
    reports = feed(restarted, offer(two, SECRET), two.blobs)
    assert reports[-1].state == "installed", [(r.state, r.reason, r.detail) for r in reports]
    assert restarted.holder.version == 2
