"""Release metadata: signed with the fleet's release key, refused by name when it must be."""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner

from takfl.release.keys import (
    KEY_FILE,
    ROOT_FILE,
    ReleaseKeyError,
    generate_release_key,
    key_matches_root,
    load_root,
    load_signer,
    make_root,
    parse_root,
)
from takfl.release.metadata import (
    MAX_METADATA_BYTES,
    ReleaseRefusal,
    ReleaseRefused,
    ReleaseSpec,
    build_release,
    check_artifact,
    sign_release,
    verify_release,
)
from takfl.release.reference import (
    ReferenceError,
    decode_reference,
    default_tolerance,
    encode_reference,
    parity,
    percentiles_ms,
)

MODEL = b"\x08\x01onnx-bytes" * 50
REFERENCE = encode_reference(np.zeros((2, 1, 8, 8), np.float32), np.eye(2, 10, dtype=np.float32))


def spec(**change: object) -> ReleaseSpec:
    fields: dict[str, object] = {
        "fleet": "lab",
        "prototype": "M",
        "round": 3,
        "runtime": "onnxruntime",
        "format": "onnx",
        "quantization": "none",
        "builder": "cnn_digits_medium",
        "num_classes": 10,
        "input_shape": (1, 8, 8),
        "mean": [0.5],
        "std": [0.25],
        "tolerance": 1e-3,
        "min_top1": 1.0,
    }
    fields.update(change)
    return ReleaseSpec.model_validate(fields)


@pytest.fixture(scope="module")
def signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


@pytest.fixture(scope="module")
def root(signer: CryptoSigner):  # type: ignore[no-untyped-def]
    return parse_root(make_root(signer))


def signed(signer: CryptoSigner, version: int = 1, **kw: object) -> bytes:
    expires = kw.pop("expires", None)
    md = build_release(
        spec=spec(**kw),
        version=version,
        model=MODEL,
        model_name="M-round-3-fp32.onnx",
        reference=REFERENCE,
        expires=expires,  # type: ignore[arg-type]
    )
    return sign_release(md, signer)


def refused(data: bytes, root, **kw: object) -> ReleaseRefusal:  # type: ignore[no-untyped-def]
    args: dict[str, object] = {"fleet": "lab", "prototype": "M"}
    args.update(kw)
    with pytest.raises(ReleaseRefused) as e:
        verify_release(data, root, **args)  # type: ignore[arg-type]
    return e.value.reason


def test_a_signed_release_verifies_with_its_targets_and_spec(signer, root) -> None:
    data = signed(signer, version=4)

    release = verify_release(data, root, fleet="lab", prototype="M", trusted_version=3)

    assert release.version == 4 and release.reinstates == 4
    assert release.spec.round == 3 and release.spec.input_shape == (1, 8, 8)
    assert release.model.path == "M/M-round-3-fp32.onnx" and release.model.length == len(MODEL)
    assert release.reference.length == len(REFERENCE)
    check_artifact(release.model, MODEL)
    check_artifact(release.reference, REFERENCE)


def test_tampered_metadata_is_refused_as_badly_signed(signer, root) -> None:
    doc = json.loads(signed(signer))
    doc["signed"]["targets"]["M/M-round-3-fp32.onnx"]["length"] += 1

    assert refused(json.dumps(doc).encode(), root) == ReleaseRefusal.BAD_SIGNATURE


def test_a_release_signed_by_an_unknown_key_is_refused(root) -> None:
    stranger = CryptoSigner.generate_ed25519()

    assert refused(signed(stranger), root) == ReleaseRefusal.BAD_SIGNATURE


def test_expired_metadata_is_refused(signer, root) -> None:
    data = signed(signer, expires=datetime.now(timezone.utc) + timedelta(seconds=60))
    later = datetime.now(timezone.utc) + timedelta(hours=1)

    assert refused(data, root, now=later) == ReleaseRefusal.EXPIRED


def test_nothing_verifies_under_an_expired_root(signer) -> None:
    old_root = parse_root(make_root(signer, lifetime=timedelta(seconds=30)))
    later = datetime.now(timezone.utc) + timedelta(minutes=5)
    data = signed(signer, expires=later + timedelta(days=1))

    assert refused(data, old_root, now=later) == ReleaseRefusal.EXPIRED


def test_an_older_version_is_refused_and_the_same_one_only_with_the_same_bytes(
    signer, root
) -> None:
    v2 = signed(signer, version=2)
    other_v2 = signed(signer, version=2, round=4)
    trusted = verify_release(v2, root, fleet="lab", prototype="M", trusted_version=1)

    again = verify_release(
        v2, root, fleet="lab", prototype="M", trusted_version=2, trusted_digest=trusted.digest
    )

    assert again.digest == trusted.digest
    assert (
        refused(other_v2, root, trusted_version=2, trusted_digest=trusted.digest)
        == ReleaseRefusal.OLD_VERSION
    )
    assert refused(signed(signer, version=1), root, trusted_version=2) == ReleaseRefusal.OLD_VERSION


def test_a_rollback_is_a_newer_version_naming_an_older_release(signer, root) -> None:
    back = verify_release(
        signed(signer, version=5, rollback_to=3),
        root,
        fleet="lab",
        prototype="M",
        trusted_version=4,
    )

    assert back.version == 5 and back.reinstates == 3
    assert refused(signed(signer, version=5, rollback_to=5), root) == ReleaseRefusal.MALFORMED


@pytest.mark.parametrize("where", [{"fleet": "other"}, {"prototype": "S"}])
def test_a_release_for_another_fleet_or_prototype_is_refused(signer, root, where) -> None:
    assert refused(signed(signer), root, **where) == ReleaseRefusal.WRONG_TARGET


def test_oversized_or_garbage_metadata_is_malformed(root) -> None:
    assert refused(b"{" * (MAX_METADATA_BYTES + 1), root) == ReleaseRefusal.MALFORMED
    assert refused(b"not json", root) == ReleaseRefusal.MALFORMED
    assert refused(make_root(CryptoSigner.generate_ed25519()), root) == ReleaseRefusal.MALFORMED


@pytest.mark.parametrize("data", [MODEL[:-1], MODEL + b"x", b"y" + MODEL[1:]])
def test_an_artifact_of_another_length_or_hash_is_refused(signer, root, data) -> None:
    release = verify_release(signed(signer), root, fleet="lab", prototype="M")

    with pytest.raises(ReleaseRefused) as e:
        check_artifact(release.model, data)

    assert e.value.reason == ReleaseRefusal.BAD_ARTIFACT


def test_provisioned_key_files_load_and_match(tmp_path: Path) -> None:
    key_path, root_path = generate_release_key(tmp_path)

    signer, root = load_signer(key_path), load_root(root_path)

    assert key_path.name == KEY_FILE and root_path.name == ROOT_FILE
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert key_matches_root(signer, root)
    assert verify_release(signed(signer), root, fleet="lab", prototype="M").version == 1
    with pytest.raises(ReleaseKeyError, match="exists"):
        generate_release_key(tmp_path)


def test_a_root_not_signed_by_its_own_key_is_refused(signer) -> None:
    doc = json.loads(make_root(signer))
    doc["signatures"] = []

    with pytest.raises(ReleaseKeyError, match="not signed"):
        parse_root(json.dumps(doc).encode())


def test_reference_files_round_trip_and_are_checked() -> None:
    x = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)
    y = np.random.default_rng(1).normal(size=(3, 10)).astype(np.float32)

    got_x, got_y = decode_reference(encode_reference(x, y), (1, 8, 8), 10)

    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    with pytest.raises(ReferenceError, match="do not fit"):
        decode_reference(encode_reference(x, y), (3, 8, 8), 10)
    with pytest.raises(ReferenceError, match="expected"):
        decode_reference(encode_reference(x, y), (1, 8, 8), 5)
    with pytest.raises(ReferenceError, match="safetensors"):
        decode_reference(b"\xff" * 20, (1, 8, 8), 10)


def test_parity_measures_distance_and_top1_agreement() -> None:
    ref = np.array([[2.0, 0.0], [0.0, 2.0]])

    close = parity(ref + 1e-4, ref)
    swapped = parity(ref[::-1], ref)
    broken = parity(np.full_like(ref, np.nan), ref)

    assert close.ok(1e-3, 1.0) and close.top1 == 1.0
    assert not swapped.ok(1e-3, 0.5) and swapped.top1 == 0.0
    assert broken.max_abs == float("inf") and not broken.ok(1e9, 0.0)
    assert default_tolerance("none", ref) == (2e-3, 1.0)
    assert default_tolerance("int8", ref)[1] < 1.0


def test_latency_percentiles_are_in_milliseconds() -> None:
    p50, p99 = percentiles_ms([0.001] * 99 + [0.1])

    assert p50 == pytest.approx(1.0) and 1.0 < p99 <= 100.0
    with pytest.raises(ValueError):
        percentiles_ms([])
