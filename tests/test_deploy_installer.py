"""The installer, without a broker: a good release installs through downloading ->
verifying -> installed; each bad input is refused with its reason while the release
installed before keeps serving (in memory and on disk)."""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Root

from edge_agent.deploy.installer import Installer, InstallPolicy
from edge_agent.deploy.slots import SlotStore
from takfl.release.keys import make_root, parse_root
from takfl.release.metadata import ReleaseRefusal
from takfl.wire.release import ReleaseReport
from takfl.wire.signing import generate_secret
from tests.release_fixtures import (
    PROTOTYPE,
    Built,
    build,
    device_profile,
    feed,
    installer,
    normalise,
    offer,
    onnx_model,
    reference_file,
    run_onnx,
    samples,
)

SECRET = generate_secret()


@pytest.fixture(scope="module")
def signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


@pytest.fixture(scope="module")
def root(signer: CryptoSigner) -> Root:
    return parse_root(make_root(signer))


@pytest.fixture(scope="module")
def models() -> dict[int, bytes]:
    return {seed: onnx_model(seed) for seed in (1, 2, 3)}


@pytest.fixture
def serving_v1(
    tmp_path: Path, signer: CryptoSigner, root: Root, models: dict[int, bytes]
) -> Installer:
    """An installer serving release 1 (model 1)."""
    inst = installer(tmp_path / "state", root)
    one = build(signer, 1, models[1])
    assert feed(inst, offer(one, SECRET), one.blobs)[-1].state == "installed"
    return inst


def states(reports: list[ReleaseReport]) -> list[str]:
    return [r.state for r in reports]


def assert_still_serving(inst: Installer, version: int, model: bytes) -> None:
    """The holder serves ``version`` and answers with ``model``'s logits; a restart too."""
    served = inst.holder.get()
    assert served is not None and served.version == version
    x = normalise(samples(4, seed=9))
    np.testing.assert_allclose(served.predict(x), run_onnx(model, x), rtol=1e-5, atol=1e-5)
    reopened = SlotStore(inst.store.folder.parent, PROTOTYPE).open()
    assert reopened is not None and reopened.record.version == version


def refused_with(reports: list[ReleaseReport]) -> str:
    assert reports[-1].state == "failed", states(reports)
    return reports[-1].reason


def test_a_good_release_installs_and_reports_each_step(
    tmp_path: Path, signer: CryptoSigner, root: Root, models: dict[int, bytes]
) -> None:
    # Prepare
    inst = installer(tmp_path / "state", root)
    release = build(signer, 1, models[1])
    # Execute
    reports = feed(inst, offer(release, SECRET, rollout="r7"), release.blobs)
    # Assert
    assert states(reports) == ["downloading", "verifying", "installed"]
    done = reports[-1]
    assert done.rollout == "r7" and done.version == 1 and done.active_version == 1
    assert done.runtime == "onnxruntime" and done.reason == "ok"
    assert done.install_s is not None and done.install_s > 0
    assert done.latency_p50_ms is not None and done.latency_p99_ms is not None
    assert 0 < done.latency_p50_ms <= done.latency_p99_ms
    assert done.peak_rss_mb is not None and done.peak_rss_mb > 0
    assert_still_serving(inst, 1, models[1])


def test_an_upgrade_switches_the_served_model(
    serving_v1: Installer, signer: CryptoSigner, models: dict[int, bytes]
) -> None:
    release = build(signer, 2, models[2])

    reports = feed(serving_v1, offer(release, SECRET), release.blobs)

    assert states(reports) == ["downloading", "verifying", "installed"]
    assert_still_serving(serving_v1, 2, models[2])


def test_a_tampered_artifact_is_refused(
    serving_v1: Installer, signer: CryptoSigner, models: dict[int, bytes]
) -> None:
    # Prepare: the model arrives with one byte changed (same length)
    release = build(signer, 2, models[2])
    blobs = release.blobs
    digest = hashlib.sha256(models[2]).hexdigest()
    tampered = bytearray(blobs[digest])
    tampered[100] ^= 0x01
    blobs[digest] = bytes(tampered)
    # Execute
    reports = feed(serving_v1, offer(release, SECRET), blobs)
    # Assert
    assert refused_with(reports) == ReleaseRefusal.BAD_ARTIFACT.value
    assert_still_serving(serving_v1, 1, models[1])


def test_an_artifact_of_the_wrong_length_is_refused(
    serving_v1: Installer, signer: CryptoSigner, models: dict[int, bytes]
) -> None:
    release = build(signer, 2, models[2])
    blobs = release.blobs
    digest = hashlib.sha256(models[2]).hexdigest()
    blobs[digest] = blobs[digest] + b"\x00" * 16  # endless data

    reports = feed(serving_v1, offer(release, SECRET), blobs)

    assert refused_with(reports) == ReleaseRefusal.BAD_ARTIFACT.value
    assert "length" in reports[-1].detail.lower()
    assert_still_serving(serving_v1, 1, models[1])


def test_expired_metadata_is_refused(
    tmp_path: Path, signer: CryptoSigner, root: Root, models: dict[int, bytes]
) -> None:
    # Prepare: a release that expires in a minute, offered to a device whose clock
    # reads an hour later
    release = build(signer, 1, models[1], expires=datetime.now(timezone.utc) + timedelta(minutes=1))
    inst = installer(tmp_path / "state", root, wall_clock=lambda: time.time() + 3600)
    # Execute
    reports = feed(inst, offer(release, SECRET), release.blobs)
    # Assert
    assert refused_with(reports) == ReleaseRefusal.EXPIRED.value
    assert inst.holder.get() is None


def test_a_lower_version_is_refused(
    serving_v1: Installer, signer: CryptoSigner, models: dict[int, bytes]
) -> None:
    # Prepare: 2 installed, then metadata of version 1 (e.g. a replay)
    two = build(signer, 2, models[2])
    assert feed(serving_v1, offer(two, SECRET), two.blobs)[-1].state == "installed"
    old = build(signer, 1, models[3])
    # Execute
    reports = feed(serving_v1, offer(old, SECRET), old.blobs)
    # Assert
    assert refused_with(reports) == ReleaseRefusal.OLD_VERSION.value
    assert_still_serving(serving_v1, 2, models[2])


def test_a_release_signed_by_an_unknown_key_is_refused(
    serving_v1: Installer, models: dict[int, bytes]
) -> None:
    stranger = build(CryptoSigner.generate_ed25519(), 2, models[2])

    reports = feed(serving_v1, offer(stranger, SECRET), stranger.blobs)

    assert refused_with(reports) == ReleaseRefusal.BAD_SIGNATURE.value
    assert_still_serving(serving_v1, 1, models[1])


def test_a_model_the_runtime_cannot_load_is_refused(
    serving_v1: Installer, signer: CryptoSigner, models: dict[int, bytes]
) -> None:
    # Prepare: garbage bytes, correctly signed (hash and length match)
    garbage = bytes(range(256)) * 8
    release = build(signer, 2, garbage, reference=reference_file(models[2]))
    # Execute
    reports = feed(serving_v1, offer(release, SECRET), release.blobs)
    # Assert
    assert states(reports) == ["downloading", "verifying", "failed"]
    assert reports[-1].reason == ReleaseRefusal.LOAD_FAILED.value
    assert_still_serving(serving_v1, 1, models[1])


def test_outputs_that_do_not_match_the_reference_fail_the_health_check(
    serving_v1: Installer, signer: CryptoSigner, models: dict[int, bytes]
) -> None:
    # Prepare: model 2 released with model 3's reference outputs
    release = build(signer, 2, models[2], reference=reference_file(models[3]))
    # Execute
    reports = feed(serving_v1, offer(release, SECRET), release.blobs)
    # Assert
    assert refused_with(reports) == ReleaseRefusal.PARITY.value
    assert_still_serving(serving_v1, 1, models[1])


def test_a_model_over_the_latency_budget_fails_the_health_check(
    tmp_path: Path, signer: CryptoSigner, root: Root, models: dict[int, bytes]
) -> None:
    # Prepare: 1 installed without a budget; the device restarts with a profile that
    # asks for 1e-6 ms
    state = tmp_path / "state"
    one = build(signer, 1, models[1])
    assert feed(installer(state, root), offer(one, SECRET), one.blobs)[-1].state == "installed"
    strict = installer(state, root, device_profile(latency_budget_ms=1e-6))
    two = build(signer, 2, models[2])
    # Execute
    reports = feed(strict, offer(two, SECRET), two.blobs)
    # Assert: refused, with the latency it measured
    assert refused_with(reports) == ReleaseRefusal.TOO_SLOW.value
    assert reports[-1].latency_p99_ms is not None and reports[-1].latency_p99_ms > 1e-6
    assert_still_serving(strict, 1, models[1])


def test_a_full_disk_is_refused_before_anything_is_fetched(
    tmp_path: Path, signer: CryptoSigner, root: Root, models: dict[int, bytes]
) -> None:
    # A real full disk needs a small filesystem of its own (a loop device or tmpfs
    # mount, root only), so the installer's free-space reader is given here: it reports
    # 1 MB free, less than the 16 MB margin plus the artifacts.
    one = build(signer, 1, models[1])
    state = tmp_path / "state"
    assert feed(installer(state, root), offer(one, SECRET), one.blobs)[-1].state == "installed"
    full = installer(state, root, disk_free=lambda _path: 1024 * 1024)
    two = build(signer, 2, models[2])

    reports = feed(full, offer(two, SECRET), two.blobs)

    assert states(reports) == ["failed"]
    assert reports[0].reason == ReleaseRefusal.NO_SPACE.value
    assert_still_serving(full, 1, models[1])


@pytest.mark.parametrize(
    ("change", "inference"),
    [
        ({"runtime": "ai-edge-litert", "format": "tflite"}, {}),
        ({}, {"memory_limit_mb": 1}),
    ],
    ids=["other-runtime", "over-memory"],
)
def test_a_release_this_device_cannot_run_is_refused(
    tmp_path: Path,
    signer: CryptoSigner,
    root: Root,
    models: dict[int, bytes],
    change: dict[str, Any],
    inference: dict[str, int],
) -> None:
    big = models[1] + b"\x00" * (2 * 1024 * 1024) if inference else models[1]
    release = build(signer, 1, big, reference=reference_file(models[1]), **change)
    inst = installer(tmp_path / "state", root, device_profile(**inference))

    reports = feed(inst, offer(release, SECRET), release.blobs)

    assert refused_with(reports) == ReleaseRefusal.INCOMPATIBLE.value
    assert inst.holder.get() is None


def test_artifacts_that_never_arrive_time_out(
    serving_v1: Installer, signer: CryptoSigner, models: dict[int, bytes]
) -> None:
    # Prepare
    release = build(signer, 2, models[2])
    started = serving_v1.offer(offer(release, SECRET))
    assert [r.state for r in started.reports] == ["downloading"] and len(started.fetch) == 2
    # Execute: one artifact arrives, then nothing until past the timeout
    serving_v1.blob(started.fetch[0].digest, release.blobs[started.fetch[0].digest])
    limit = InstallPolicy().download_timeout_s
    decision = serving_v1.tick(serving_v1.clock() + limit + 1)
    # Assert
    assert [r.reason for r in decision.reports] == [ReleaseRefusal.DOWNLOAD_FAILED.value]
    assert decision.drop == (started.fetch[1].digest,)
    assert_still_serving(serving_v1, 1, models[1])


def test_trust_moves_forward_even_when_the_install_fails(
    serving_v1: Installer, signer: CryptoSigner, models: dict[int, bytes]
) -> None:
    # Prepare: a version 2 that fails its health check
    bad = build(signer, 2, models[2], reference=reference_file(models[3]))
    assert refused_with(feed(serving_v1, offer(bad, SECRET), bad.blobs)) == "parity"
    # Execute: other metadata with the same version
    other = build(signer, 2, models[2])
    reports = feed(serving_v1, offer(other, SECRET), other.blobs)
    # Assert
    assert refused_with(reports) == ReleaseRefusal.OLD_VERSION.value


def test_a_rollback_reinstates_the_previous_model_without_a_download(
    serving_v1: Installer, signer: CryptoSigner, models: dict[int, bytes]
) -> None:
    # Prepare: 2 installed over 1
    two = build(signer, 2, models[2])
    assert feed(serving_v1, offer(two, SECRET), two.blobs)[-1].state == "installed"
    one = build(signer, 1, models[1])
    back = build(signer, 3, models[1], reference=one.reference, rollback_to=1)
    # Execute: release 3 names release 1 and carries its artifacts; none is provided
    reports = feed(serving_v1, offer(back, SECRET, action="rollback"), blobs={})
    # Assert
    assert states(reports) == ["downloading", "verifying", "installed"]
    assert "0 artifact(s)" in reports[0].detail
    assert_still_serving(serving_v1, 3, models[1])


def test_the_same_offer_again_is_answered_without_reinstalling(
    serving_v1: Installer, models: dict[int, bytes]
) -> None:
    # Prepare: the exact metadata installed, offered again (a retry of the coordinator)
    active = serving_v1.store.active
    assert active is not None
    first = serving_v1.holder.get()
    same = Built(version=1, metadata=active.metadata, model=b"", reference=b"")
    # Execute
    reports = feed(serving_v1, offer(same, SECRET), blobs={})
    # Assert
    assert states(reports) == ["installed"] and reports[0].active_version == 1
    assert serving_v1.holder.get() is first


def test_a_model_file_not_of_the_released_format_is_refused(
    tmp_path: Path, signer: CryptoSigner, root: Root, models: dict[int, bytes]
) -> None:
    release = build(signer, 1, models[1], model_name="S-round-1-fp32.tflite")
    inst = installer(tmp_path / "state", root)

    reports = feed(inst, offer(release, SECRET), release.blobs)

    assert refused_with(reports) == ReleaseRefusal.MALFORMED.value
    assert "not in the release's format" in reports[-1].detail
