"""Releases from a real (small) run: the export each profile asks for, made when missing,
refused when it did not verify; signed metadata that verifies against the fleet's root,
artifacts that match it, and reference outputs the artifact reproduces."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from coordinator.broker import free_port
from coordinator.broker.net import LOOPBACK
from coordinator.cli import app
from coordinator.deploy.build import release_target, releases_from_run
from coordinator.deploy.publish import ReleaseBuildError, Signing
from coordinator.deploy.records import RolloutState
from coordinator.deploy.store import ReleaseStore
from coordinator.engine import RoundPolicy
from coordinator.registry import provision_agents
from coordinator.service import FederationRun, ServeOptions
from coordinator.store import RunStore
from coordinator.transport.inprocess import InProcessTransport, VirtualClient
from export.runtimes import load_artifact
from export.tflite_export import litert_torch_importable
from profiles import __file__ as profiles_init
from takfl.config import load_federation, prototype_training
from takfl.federation_data import build_federation_data
from takfl.mqtt.client import MqttSettings
from takfl.mqtt.credentials import mqtt_password
from takfl.release.keys import generate_release_key, load_root
from takfl.release.metadata import check_artifact, verify_release
from takfl.release.reference import decode_reference, parity
from tests.deploy_fixtures import SimDevice, signing_for

pytestmark = pytest.mark.export
_LITERT_OK, _LITERT_WHY = litert_torch_importable()
DEVICES = Path(profiles_init).parent / "devices"


def make_run(root: Path, rounds: int = 1) -> Path:
    """A digits federation run with FedAvg, in process: config, state, checkpoints."""
    torch.manual_seed(0)
    cfg = load_federation("digits")
    cfg.algorithm.name = "fedavg"
    data = build_federation_data(cfg, 0)
    clients = [
        VirtualClient(client_id=cid, prototype=p, x=x, y=y, training=prototype_training(cfg, p))
        for cid, (p, x, y) in data.clients.items()
    ]
    transport = InProcessTransport(clients, num_classes=10, input_shape=(1, 8, 8))
    options = ServeOptions(rounds=rounds, policy=RoundPolicy(deadline_s=30))
    FederationRun(cfg, data, transport, RunStore(root), torch.device("cpu"), options).run()
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("deploy") / "run")


@pytest.fixture(scope="module")
def signing(tmp_path_factory: pytest.TempPathFactory) -> Signing:
    return signing_for(tmp_path_factory.mktemp("keys"), "digits")


def released_model(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


@pytest.mark.skipif(not _LITERT_OK, reason=_LITERT_WHY)
def test_a_release_of_each_profiles_export_verifies_and_reproduces_its_reference(
    run: Path, signing: Signing, tmp_path: Path
) -> None:
    lines: list[str] = []

    published = releases_from_run(run, ["L", "M"], signing, report=lines.append)

    assert any("exporting round 1 of L, M" in line for line in lines)
    for proto, (fmt, quant, runtime) in {
        "L": ("onnx", "none", "onnxruntime"),
        "M": ("tflite", "int8", "ai-edge-litert"),
    }.items():
        pub = published[proto]
        data = ReleaseStore(run).metadata(proto, 1)
        release = verify_release(data, signing.root, fleet="digits", prototype=proto)
        spec = release.spec
        assert pub.version == release.version == 1 and spec.round == 1
        assert (spec.format, spec.quantization, spec.runtime) == (fmt, quant, runtime)
        assert spec.input_shape == (1, 8, 8) and spec.num_classes == 10 and spec.mean
        model, reference = (pub.blobs[a.sha256] for a in (release.model, release.reference))
        check_artifact(release.model, model)
        check_artifact(release.reference, reference)
        exported = run / "exports" / proto / release.model.path.split("/")[1]
        assert exported.read_bytes() == model
        inputs, outputs = decode_reference(reference, spec.input_shape, spec.num_classes)
        assert inputs.shape == (8, 1, 8, 8)
        runner = load_artifact(
            released_model(tmp_path, exported.name, model), runtime=runtime, check_digest=False
        )
        assert parity(runner.run(inputs), outputs).ok(spec.tolerance, spec.min_top1)
    assert published["M"].release.spec.tolerance > published["L"].release.spec.tolerance


def test_the_next_release_reuses_the_export_and_takes_the_next_version(
    run: Path, signing: Signing
) -> None:
    lines: list[str] = []

    first = releases_from_run(run, ["L"], signing, report=lines.append)["L"]
    second = releases_from_run(run, ["L"], signing, report=lines.append)["L"]

    assert second.version == first.version + 1
    assert second.release.model == first.release.model  # same export, same artifact
    assert second.release.digest != first.release.digest
    assert sum("exporting" in line for line in lines) <= 1


def test_an_export_whose_verification_failed_is_refused(
    run: Path, signing: Signing, tmp_path: Path
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("releases"))
    releases_from_run(copy, ["L"], signing, report=lambda _: None)  # exported and verified
    report_path = copy / "exports" / "L" / "report.json"
    report = json.loads(report_path.read_text())
    for row in report["rows"]:
        if row["format"] == "onnx":
            row["status"], row["reason"] = "MISMATCH", "max |diff| 3e-02 > 1e-04"
    report_path.write_text(json.dumps(report))

    with pytest.raises(ReleaseBuildError, match="did not verify in onnxruntime"):
        releases_from_run(copy, ["L"], signing, report=lambda _: None)


def test_a_tampered_artifact_is_refused(run: Path, signing: Signing, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("releases"))
    releases_from_run(copy, ["L"], signing, report=lambda _: None)
    artifact = copy / "exports" / "L" / "L-round-1-fp32.onnx"
    artifact.write_bytes(artifact.read_bytes() + b"\x00")

    with pytest.raises(ReleaseBuildError, match=r"refusing to release L-round-1-fp32\.onnx"):
        releases_from_run(copy, ["L"], signing, report=lambda _: None)


def test_an_earlier_round_is_exported_from_its_checkpoint(run: Path, signing: Signing) -> None:
    lines: list[str] = []

    pub = releases_from_run(run, ["L"], signing, round_=0, report=lines.append)["L"]

    assert pub.release.spec.round == 0 and pub.release.model.path == "L/L-round-0-fp32.onnx"
    assert any("exporting round 0 of L (round-0.safetensors)" in line for line in lines)


def test_unknown_prototypes_and_profiles_that_run_pytorch_are_refused(
    run: Path, signing: Signing, tmp_path: Path
) -> None:
    profile = yaml.safe_load((DEVICES / "workstation.yaml").read_text())
    profile["inference"] = {"runtime": "torch", "format": "torch"}
    (tmp_path / "torch.yaml").write_text(yaml.safe_dump(profile))
    cfg = load_federation("digits")
    cfg.prototypes[2].profile = str(tmp_path / "torch.yaml")

    with pytest.raises(ReleaseBuildError, match="runs PyTorch directly"):
        release_target(cfg, "L")
    with pytest.raises(ReleaseBuildError, match="unknown prototype XL"):
        releases_from_run(run, ["XL"], signing)


@pytest.mark.slow  # a real broker and seconds of waiting: the full suite runs it
def test_release_command_rolls_out_each_tier_and_halts_one_with_nothing_to_roll_back(
    run: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("releases"))
    records = provision_agents(load_federation(copy / "config.yaml"), copy)
    generate_release_key(copy)
    root = load_root(copy / "root.json")
    port = free_port()
    base = MqttSettings(host=LOOPBACK, port=port, reconnect_min_s=1, reconnect_max_s=1)
    devices = [
        SimDevice(
            settings=replace(base, username=r.agent_id, password=mqtt_password(r.secret)),
            fleet="digits",
            agent_id=r.agent_id,
            prototype=r.prototype,
            secret=r.secret,
            root=root,
            behaviour="fails" if r.agent_id == "M-000" else "healthy",
        )
        for r in records
        if r.prototype in ("M", "L")
    ]
    for d in devices:
        d.client.start(timeout=None)  # connects once the command's broker is up
    try:
        result = CliRunner().invoke(
            app,
            ["release", str(copy), "--prototype", "L", "--prototype", "M", "--port", str(port),
             "--stages", "50%,100%", "--device-timeout", "60", "--timeout", "120"],
        )  # fmt: skip
    finally:
        for d in devices:
            d.stop()

    assert result.exit_code == 1, result.output  # M did not complete
    assert "not completed: M-v1 halted" in result.output
    by_tier = {r.prototype: r for r in ReleaseStore(copy).load_rollouts()}
    assert by_tier["L"].state == RolloutState.COMPLETED
    assert {d.state.value for d in by_tier["L"].devices.values()} == {"installed"}
    m = by_tier["M"]
    assert m.state == RolloutState.HALTED and "no previous release" in m.halt_reason
    assert m.devices["M-000"].reason == "parity"
    # the first stage (3 of 5) was offered; the halt kept the rest from being offered
    assert {a for a, d in m.devices.items() if d.state.value == "pending"} == {"M-003", "M-004"}
    for d in devices:
        if d.prototype == "L":
            assert d.active == 1 and d.trusted.version == 1
        elif d.agent_id in ("M-003", "M-004"):
            assert d.offers == []
