"""HMAC signatures detect tampering."""

from __future__ import annotations

import pytest

from takfl.wire.messages import BlobRef, Registration, UpdateHeader
from takfl.wire.signing import sign, verify
from takfl.wire.update import signed_update_header

SECRET = b"k" * 32
DIGEST = "0f" * 32


def header() -> UpdateHeader:
    return UpdateHeader(
        round_id=3,
        agent_id="pi-1",
        prototype="S",
        base_digest=DIGEST,
        blob=BlobRef(digest="aa" * 32, size=10, chunk_size=4, count=3),
        compression="fp16",
        num_samples=12,
        metrics={"loss": 0.25},
    )


def test_signed_header_verifies_only_with_its_secret() -> None:
    h = sign(header(), SECRET)
    assert len(h.signature) == 64
    assert verify(h, SECRET)
    assert not verify(h, b"j" * 32)
    assert not verify(header(), SECRET)  # unsigned


@pytest.mark.parametrize(
    "change",
    [
        {"round_id": 2},
        {"agent_id": "pi-2"},
        {"prototype": "M"},
        {"base_digest": "1f" * 32},
        {"blob": BlobRef(digest="bb" * 32, size=10, chunk_size=4, count=3)},
        {"num_samples": 13},
        {"metrics": {"loss": 0.2500001}},
        {"compression": "int8"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_any_changed_field_breaks_the_signature(change: dict[str, object]) -> None:
    h = sign(header(), SECRET)
    tampered = h.model_copy(update=change)
    assert not verify(tampered, SECRET)
    assert verify(signed_update_header(h, SECRET, **change), SECRET)


def test_signature_of_one_kind_does_not_verify_another() -> None:
    reg = Registration(
        agent_id="pi-1",
        prototype="S",
        profile="p",
        hardware_class="phone",
        num_samples=1,
        sent_at=0.0,
    )
    h = sign(header(), SECRET)
    assert not verify(reg.model_copy(update={"signature": h.signature}), SECRET)
