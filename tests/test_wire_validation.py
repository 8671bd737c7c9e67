"""Every refusal of a received update has its own named reason."""

from __future__ import annotations

import pytest
import torch

from takfl.wire.chunking import blob_ref
from takfl.wire.codec import encode_state
from takfl.wire.messages import BlobRef, ModelRef, Registration, TaskMessage, UpdateHeader
from takfl.wire.signing import sign
from takfl.wire.update import PreparedUpdate, prepare_update, signed_update_header
from takfl.wire.validation import (
    AgentRecord,
    Refusal,
    UpdateBounds,
    check_delta,
    check_header,
    check_registration,
    check_stored_update,
    decode_update,
    delta_norm,
)

torch.set_num_threads(1)
SECRET = b"s" * 32
REGISTRY = {
    "pi-1": AgentRecord(agent_id="pi-1", prototype="S", secret=SECRET),
    "jet-1": AgentRecord(agent_id="jet-1", prototype="M", secret=b"m" * 32),
    "capped": AgentRecord(agent_id="capped", prototype="S", secret=SECRET, max_samples=20),
}
GLOBAL_DIGEST = "0f" * 32
# ||reference|| = 3.55, so deltas up to 8.87 pass
BOUNDS = UpdateBounds(norm_factor=2.5, max_blob_bytes=1 << 20)


def reference() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(4, 3, generator=g),
        "b": torch.zeros(3),
        "n": torch.tensor(4, dtype=torch.int64),
    }


def task(round_id: int = 5, agent: str = "pi-1", prototype: str = "S") -> TaskMessage:
    return TaskMessage(
        round_id=round_id,
        agent_id=agent,
        prototype=prototype,
        model=ModelRef(builder="mlp_digits"),
        num_classes=10,
        input_shape=(1, 8, 8),
        seed=0,
        deadline=1e12,
        compression="fp32",
        chunk_size=64,
        blob=BlobRef(digest=GLOBAL_DIGEST, size=1, chunk_size=64, count=1),
    )


def good_update() -> PreparedUpdate:
    base = reference()
    trained = {k: v + 0.1 if v.is_floating_point() else v + 1 for k, v in base.items()}
    return prepare_update(task(), trained, base, secret=SECRET, num_samples=10)


def header_verdict(
    header: UpdateHeader, *, current_round: int = 5, base: str | None = GLOBAL_DIGEST
) -> Refusal | None:
    return check_header(
        header,
        REGISTRY,
        current_round=current_round,
        base_digest=base,
        max_blob_bytes=BOUNDS.max_blob_bytes,
    ).reason


def test_good_update_is_accepted_and_decoded() -> None:
    up = good_update()
    assert header_verdict(up.header) is None
    verdict, delta = decode_update(up.header, up.blob, reference(), bounds=BOUNDS)
    assert verdict.accepted, verdict
    assert delta is not None
    torch.testing.assert_close(delta["w"], torch.full((4, 3), 0.1))
    assert int(delta["n"]) == 5


def test_header_refusals_are_named() -> None:
    h = good_update().header
    assert header_verdict(h.model_copy(update={"agent_id": "ghost"})) is Refusal.UNKNOWN_AGENT
    assert header_verdict(h.model_copy(update={"num_samples": 10_000})) is Refusal.BAD_SIGNATURE
    assert header_verdict(sign(h, b"x" * 32)) is Refusal.BAD_SIGNATURE
    assert header_verdict(signed_update_header(h, SECRET, prototype="M")) is Refusal.WRONG_PROTOTYPE
    assert header_verdict(h, current_round=6) is Refusal.STALE_ROUND
    assert header_verdict(h, current_round=4) is Refusal.FUTURE_ROUND
    assert header_verdict(h, base=None) is Refusal.NOT_ASSIGNED
    assert header_verdict(h, base="1f" * 32) is Refusal.WRONG_BASE
    huge = BlobRef(digest="aa" * 32, size=(1 << 20) + 1, chunk_size=1 << 16, count=17)
    assert header_verdict(signed_update_header(h, SECRET, blob=huge)) is Refusal.TOO_LARGE


def test_blob_refusals_are_named() -> None:
    up = good_update()
    ref = reference()

    def verdict_of(header: UpdateHeader, blob: bytes) -> Refusal | None:
        return decode_update(header, blob, ref, bounds=BOUNDS)[0].reason

    assert verdict_of(up.header, up.blob[:-1] + b"\x00") is Refusal.DIGEST_MISMATCH
    garbage = PreparedUpdate(up.header, b"\x00" * 64)
    g_header = signed_update_header(up.header, SECRET, blob=blob_ref(garbage.blob, 64))
    assert verdict_of(g_header, garbage.blob) is Refusal.MALFORMED


@pytest.mark.parametrize(
    ("delta", "reason"),
    [
        ({"w": torch.zeros(4, 3), "b": torch.zeros(3)}, Refusal.SHAPE_MISMATCH),
        (
            {
                "w": torch.zeros(4, 3),
                "b": torch.zeros(3),
                "n": torch.tensor(1),
                "x": torch.zeros(1),
            },
            Refusal.SHAPE_MISMATCH,
        ),
        (
            {"w": torch.zeros(3, 4), "b": torch.zeros(3), "n": torch.tensor(1)},
            Refusal.SHAPE_MISMATCH,
        ),
        (
            {"w": torch.zeros(4, 3), "b": torch.zeros(3), "n": torch.tensor(1.0)},
            Refusal.SHAPE_MISMATCH,
        ),
        (
            {
                "w": torch.zeros(4, 3, dtype=torch.float16),
                "b": torch.zeros(3),
                "n": torch.tensor(1),
            },
            Refusal.SHAPE_MISMATCH,
        ),
        (
            {
                "w": torch.tensor([[float("nan")] * 3] * 4),
                "b": torch.zeros(3),
                "n": torch.tensor(1),
            },
            Refusal.NON_FINITE,
        ),
        (
            {
                "w": torch.zeros(4, 3),
                "b": torch.tensor([0.0, float("inf"), 0.0]),
                "n": torch.tensor(1),
            },
            Refusal.NON_FINITE,
        ),
        (
            {"w": torch.full((4, 3), 3.0), "b": torch.zeros(3), "n": torch.tensor(1)},
            Refusal.NORM_BOUND,
        ),
        ({"w": torch.full((4, 3), 2.0), "b": torch.zeros(3), "n": torch.tensor(10**9)}, None),
    ],
    ids=["missing", "extra", "shape", "int-as-float", "fp16", "nan", "inf", "norm", "ok"],
)
def test_delta_checks(delta: dict[str, torch.Tensor], reason: Refusal | None) -> None:
    assert check_delta(delta, reference(), bounds=BOUNDS).reason is reason


def test_delta_norm_ignores_integer_tensors() -> None:
    assert delta_norm({"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(100)}) == 5.0


def test_wrong_shapes_inside_a_genuine_blob_are_refused() -> None:
    up = good_update()
    bad = {"w": torch.zeros(2, 2), "b": torch.zeros(3), "n": torch.tensor(1)}
    blob = encode_state(bad, "fp32")
    h = signed_update_header(up.header, SECRET, blob=blob_ref(blob, 64))
    assert header_verdict(h) is None
    assert decode_update(h, blob, reference(), bounds=BOUNDS)[0].reason is Refusal.SHAPE_MISMATCH


def test_registration_checks() -> None:
    reg = Registration(
        agent_id="pi-1",
        prototype="S",
        profile="raspberry-pi-4",
        hardware_class="raspberry-pi",
        num_samples=3,
        sent_at=0.0,
    )
    assert check_registration(sign(reg, SECRET), REGISTRY).accepted
    assert check_registration(reg, REGISTRY).reason is Refusal.BAD_SIGNATURE
    ghost = reg.model_copy(update={"agent_id": "ghost"})
    assert check_registration(sign(ghost, SECRET), REGISTRY).reason is Refusal.UNKNOWN_AGENT
    wrong = reg.model_copy(update={"prototype": "M"})
    assert check_registration(sign(wrong, SECRET), REGISTRY).reason is Refusal.WRONG_PROTOTYPE


def test_norm_bound_is_relative_to_the_global_model() -> None:
    delta = {"w": torch.full((4, 3), 2.0), "b": torch.zeros(3), "n": torch.tensor(1)}  # 6.93
    ref = reference()
    assert check_delta(delta, ref, bounds=BOUNDS).accepted
    small = {k: v / 10 if v.is_floating_point() else v for k, v in ref.items()}  # norm 0.35
    # the same delta against a global ten times smaller is out of bounds...
    verdict = check_delta(delta, small, bounds=BOUNDS)
    assert verdict.reason is Refusal.NORM_BOUND
    assert "x global norm" in verdict.detail
    # ...unless the floor (here 3) lifts the bound for near-zero globals
    floor = UpdateBounds(norm_factor=2.5, norm_floor=3.0)
    assert check_delta(delta, small, bounds=floor).accepted
    assert BOUNDS.max_norm(ref) == pytest.approx(2.5 * 3.5493, rel=1e-4)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_update_bounds_refuse_meaningless_factors(bad: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        UpdateBounds(norm_factor=bad)
    with pytest.raises(ValueError, match="positive"):
        UpdateBounds(norm_floor=bad)


def test_sample_count_must_be_positive_and_within_the_allowance() -> None:
    h = good_update().header
    assert header_verdict(signed_update_header(h, SECRET, num_samples=0)) is Refusal.NO_SAMPLES
    capped = signed_update_header(h, SECRET, agent_id="capped")
    assert header_verdict(signed_update_header(capped, SECRET, num_samples=20)) is None
    over = signed_update_header(capped, SECRET, num_samples=21)
    assert header_verdict(over) is Refusal.SAMPLE_CAP
    # an agent without a pinned allowance may claim any positive count
    assert header_verdict(signed_update_header(h, SECRET, num_samples=2**40)) is None


def test_registration_sample_counts() -> None:
    reg = Registration(
        agent_id="capped",
        prototype="S",
        profile="android-phone",
        hardware_class="phone",
        num_samples=0,
        sent_at=0.0,
    )
    assert check_registration(sign(reg, SECRET), REGISTRY).reason is Refusal.NO_SAMPLES
    big = reg.model_copy(update={"num_samples": 21})
    assert check_registration(sign(big, SECRET), REGISTRY).reason is Refusal.SAMPLE_CAP
    ok = reg.model_copy(update={"num_samples": 20})
    assert check_registration(sign(ok, SECRET), REGISTRY).accepted


def test_stored_updates_are_checked_again() -> None:
    ref = reference()
    good = {k: v + 0.1 if v.is_floating_point() else v for k, v in ref.items()}
    far = {k: v + 5.0 if v.is_floating_point() else v for k, v in ref.items()}
    nan = dict(good, b=torch.full((3,), float("nan")))

    def reason(agent: str, state: dict[str, torch.Tensor], n: int = 10) -> Refusal | None:
        return check_stored_update(agent, "S", n, state, ref, REGISTRY, bounds=BOUNDS).reason

    assert reason("pi-1", good) is None
    assert reason("revoked", good) is Refusal.UNKNOWN_AGENT
    assert reason("jet-1", good) is Refusal.WRONG_PROTOTYPE
    assert reason("pi-1", good, n=0) is Refusal.NO_SAMPLES
    assert reason("capped", good, n=500) is Refusal.SAMPLE_CAP
    assert reason("pi-1", nan) is Refusal.NON_FINITE
    assert reason("pi-1", far) is Refusal.NORM_BOUND
    # without a registry (virtual clients) only the content and the count are checked
    no_registry = check_stored_update("anyone", "S", 0, good, ref, None, bounds=BOUNDS)
    assert no_registry.reason is Refusal.NO_SAMPLES


@pytest.mark.parametrize("codec", ["sign1:density=0.6", "rot2", "topk-int8:density=0.5"])
def test_packed_updates_are_decoded_against_the_reference(codec: str) -> None:
    # Prepare
    base = reference()
    trained = {k: v + 0.1 if v.is_floating_point() else v + 1 for k, v in base.items()}
    up = prepare_update(task(), trained, base, secret=SECRET, num_samples=10, compression=codec)
    # Execute
    verdict, delta = decode_update(up.header, up.blob, base, bounds=BOUNDS)
    # Assert: the delta comes back in the reference's layout; the integer counter exact
    assert verdict.accepted and delta is not None
    assert delta["w"].shape == (4, 3) and int(delta["n"]) == 5
    assert up.residual is not None  # every packed codec keeps one


def test_a_packed_blob_is_refused_for_another_codec_or_a_field_out_of_bounds() -> None:
    base = reference()
    trained = {k: v + 0.1 if v.is_floating_point() else v for k, v in base.items()}
    up = prepare_update(task(), trained, base, secret=SECRET, num_samples=10, compression="sign1")
    claims_rot2 = signed_update_header(up.header, SECRET, compression="rot2")
    verdict, _ = decode_update(claims_rot2, up.blob, base, bounds=BOUNDS)
    assert verdict.reason is Refusal.CODEC_MISMATCH
    # every byte of the blob flipped in turn (re-announced with its new digest): the
    # decoder never raises; a changed frame, count or scale is refused as malformed, and a
    # flipped sign bit is simply another update of the same layout
    reasons = []
    for i in range(len(up.blob)):
        bad = bytearray(up.blob)
        bad[i] ^= 0xFF
        ref = blob_ref(bytes(bad), 64)
        header = signed_update_header(up.header, SECRET, blob=ref.model_dump())
        verdict, delta = decode_update(header, bytes(bad), base, bounds=BOUNDS)
        assert (delta is None) == (not verdict.accepted)
        reasons.append(verdict.reason)
    refused = {r for r in reasons if r is not None}
    assert refused <= {Refusal.MALFORMED, Refusal.CODEC_MISMATCH, Refusal.NORM_BOUND}
    assert Refusal.MALFORMED in refused
