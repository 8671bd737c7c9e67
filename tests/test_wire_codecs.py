"""The codec registry and the sub-byte codecs: properties on tiny tensors, error-feedback
telescoping, and decoders that refuse every malformed field."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from takfl.wire.codec import encode_state
from takfl.wire.codec_names import CODECS, CodecChoice, CodecNameError, parse_codec
from takfl.wire.codecs import (
    codec_units,
    decode_blob,
    encode_with_feedback,
    resolve_codec,
)
from takfl.wire.errors import CodecError, LayoutMismatch
from takfl.wire.packing import fingerprint, layout, pack, u8, u32, varints
from takfl.wire.rotation import hadamard, signs
from takfl.wire.sections import fed_back
from takfl.wire.sign import sent_mask

torch.set_num_threads(1)
SEEDS = range(4)
PACKED = ("topk-int8", "topk-fp16", "sign1", "rot2", "rot3", "rot4")
VAR, MEAN = "bn.running_var", "bn.running_mean"


def tiny_delta(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g) * scale,
        "conv.bias": torch.randn(4, generator=g) * 1e-3,
        MEAN: torch.randn(4, generator=g) * 0.1,
        VAR: torch.rand(4, generator=g) - 0.3,
        "bn.num_batches_tracked": torch.tensor(17 + seed, dtype=torch.int64),
        "mask": torch.rand(5, generator=g) > 0.5,
        "scalar": torch.tensor(0.25),
        "fc.weight": torch.randn(10, 70, generator=g) * 0.01,
    }


BASE = {
    k: torch.ones_like(v) if k == VAR else torch.zeros_like(v) for k, v in tiny_delta(0).items()
}


def sq(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor] | None = None) -> float:
    """Sum of squares over the fed-back entries of ``a`` (or of ``a - b``)."""
    return sum(
        float((a[k] - (b[k] if b is not None else 0)).double().pow(2).sum()) for k in fed_back(a)
    )


def roundtrip(name: str, delta: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    codec = resolve_codec(name)
    return decode_blob(codec.encode(delta, BASE, seed=seed), BASE)


# -- the registry ----------------------------------------------------------------------
def test_registry_holds_every_named_codec_in_order() -> None:
    assert list(codec_units()) == list(CODECS)
    assert all(u.reference for u in codec_units().values())


def test_unknown_names_and_bad_settings_are_refused_with_the_known_ones() -> None:
    with pytest.raises(CodecNameError, match=r"unknown compression 'bf8'.*'topk-int8'"):
        resolve_codec("bf8")
    for bad, fragment in [
        ("topk-int8:density=0", "density must be in"),
        ("topk-int8:density=1.5", "density must be in"),
        ("topk-int8:density=x", "density must be a number"),
        ("sign1:block=100", "power of two"),
        ("rot3:block=8192", "power of two"),
        ("fp16:density=0.1", "fp16 takes no settings"),
        ("rot2:density=0.1", "rot2 takes block"),
        ("topk-fp16:density=0.1,density=0.2", "given twice"),
    ]:
        with pytest.raises(CodecNameError, match=fragment):
            parse_codec(bad)


def test_choice_text_is_canonical_and_parses_back() -> None:
    for text in ("fp16", "topk-int8:density=0.02", "sign1:block=128,density=0.8", "rot3:block=256"):
        choice = parse_codec(text)
        assert str(choice) == text
        assert parse_codec(str(choice)) == choice
    assert str(parse_codec("rot2")) == "rot2:block=256"
    assert str(parse_codec("topk-int8")) == "topk-int8:density=0.03"
    assert str(parse_codec("sign1:density=0.5")) == "sign1:block=256,density=0.5"
    assert parse_codec(" topk-fp16 : density = 0.5 ") == CodecChoice("topk-fp16", density=0.5)


@pytest.mark.parametrize("name", ["fp32", "fp16", "int8"])
def test_tensor_codecs_are_byte_for_byte_encode_state(name: str) -> None:
    delta = tiny_delta(0)
    codec = resolve_codec(name)
    blob = codec.encode(delta, BASE)
    assert blob == encode_state(delta, name)
    assert not codec.error_feedback
    assert set(codec.decode(blob, BASE)) == set(delta)


# -- round trips -----------------------------------------------------------------------
@pytest.mark.parametrize("name", PACKED)
@pytest.mark.parametrize("seed", SEEDS)
def test_integer_entries_come_back_exactly_and_floats_as_float32(name: str, seed: int) -> None:
    delta = tiny_delta(seed)
    out = roundtrip(name, delta, seed)
    assert set(out) == set(delta)
    for k, t in delta.items():
        if t.is_floating_point():
            assert out[k].dtype == torch.float32 and out[k].shape == t.shape
        else:
            assert out[k].dtype == t.dtype and torch.equal(out[k], t)


def test_every_integer_dtype_and_value_range_survives() -> None:
    ref = {
        "a": torch.tensor([-(2**63), 2**63 - 1, 0, -1], dtype=torch.int64),
        "b": torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32),
        "c": torch.tensor([0, 255], dtype=torch.uint8),
        "d": torch.tensor([[True, False]]),
        "e": torch.tensor(-7, dtype=torch.int16),
    }
    out = decode_blob(resolve_codec("sign1").encode(ref, ref), ref)
    for k, t in ref.items():
        assert out[k].dtype == t.dtype and torch.equal(out[k], t), k


@pytest.mark.parametrize("name", PACKED)
@pytest.mark.parametrize("seed", SEEDS)
def test_statistics_stay_close_and_a_variance_never_turns_negative(name: str, seed: int) -> None:
    delta = tiny_delta(seed)
    delta[VAR][0] = -5.0  # the trained variance would be negative: sent as the smallest ratio
    out = roundtrip(name, delta, seed)
    var = BASE[VAR] + out[VAR]
    assert bool((var >= 0).all())
    trained = BASE[VAR] + delta[VAR]
    ratio = torch.log(trained[1:] / BASE[VAR][1:]).abs()
    step = float(max(ratio.max(), 16.0)) / 7  # the 4-bit step of the log-ratios
    assert torch.allclose(torch.log(var[1:] / trained[1:]), torch.zeros(3), atol=step * 0.51)
    mean_step = float(delta[MEAN].abs().max()) / 7
    assert bool(((out[MEAN] - delta[MEAN]).abs() <= mean_step * 0.51 + 1e-7).all())


def test_a_variance_needs_a_positive_reference() -> None:
    base = dict(BASE, **{VAR: torch.tensor([1.0, 0.0, 1.0, 1.0])})
    with pytest.raises(CodecError, match="reference variance must be positive"):
        resolve_codec("sign1").encode(tiny_delta(0), base)


@pytest.mark.parametrize("name", PACKED)
def test_zero_delta_decodes_to_zero(name: str) -> None:
    delta = {
        k: torch.zeros_like(t) if t.is_floating_point() else t for k, t in tiny_delta(0).items()
    }
    out = roundtrip(name, delta)
    assert sq(out) == 0.0 and float(out[VAR].abs().max()) == 0.0


@pytest.mark.parametrize("values", ["int8", "fp16"])
@pytest.mark.parametrize("seed", SEEDS)
def test_topk_sends_the_largest_entries_of_each_tensor(values: str, seed: int) -> None:
    delta = tiny_delta(seed)
    density = 0.1
    out = roundtrip(f"topk-{values}:density={density}", delta)
    for k in fed_back(delta):
        x, d = delta[k].reshape(-1), out[k].reshape(-1)
        k_sent = min(math.ceil(density * x.numel()), int((x != 0).sum()))
        sent = torch.zeros(x.numel(), dtype=torch.bool)
        sent[torch.argsort(x.abs(), descending=True, stable=True)[:k_sent]] = True
        # nothing left out is larger than anything sent, and what is left out is zero
        left_out = x[~sent].abs()
        assert left_out.numel() == 0 or float(left_out.max()) <= float(x[sent].abs().min())
        assert not bool(d[~sent].any())
        bound = (
            x[sent].abs().max() / 254 * (1 + 2.0**-10)  # f16 scale: half a step, rounded
            if values == "int8"
            else x[sent].abs() * 2.0**-11 + 2.0**-24
        )
        assert bool(((d[sent] - x[sent]).abs() <= bound).all()), k


@pytest.mark.parametrize("seed", SEEDS)
def test_sign_sends_block_mean_magnitude_with_each_sign(seed: int) -> None:
    delta = tiny_delta(seed)
    block = 8
    out = roundtrip(f"sign1:block={block}", delta)
    for k in fed_back(delta):
        x, d = delta[k].reshape(-1).double(), out[k].reshape(-1).double()
        assert bool(((d >= 0) == (x >= 0)).all())
        for start in range(0, x.numel(), block):
            mean = float(x[start : start + block].abs().mean())
            assert float(d[start : start + block].abs().max()) == pytest.approx(mean, rel=1e-3)
    # the mean-magnitude scale never makes the error worse than sending nothing
    assert sq(delta, out) <= sq(delta) * (1 + 1e-3)


@pytest.mark.parametrize("density", [0.75, 0.5])
def test_sign_below_a_bit_sends_a_seeded_subset(density: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 256, generator=g)
    delta, base = {"w": x}, {"w": torch.zeros(8, 256)}
    codec = resolve_codec(f"sign1:density={density}")
    blob = codec.encode(delta, base, seed=3)
    out = codec.decode(blob, base)["w"].reshape(-1)
    sent = torch.from_numpy(sent_mask(round(256 * density), 3, 0, x.numel()))
    assert abs(float(sent.float().mean()) - density) < 0.03
    assert torch.equal(out != 0, sent)  # exactly the drawn subset, which costs no index
    assert bool(((out[sent] > 0) == (x.reshape(-1)[sent] >= 0)).all())
    other = codec.decode(codec.encode(delta, base, seed=4), base)["w"].reshape(-1)
    assert not torch.equal(other != 0, sent)
    full = len(resolve_codec("sign1").encode(delta, base))
    assert len(blob) == full - (x.numel() - int(sent.sum())) // 8


def test_hadamard_is_orthonormal_and_its_own_inverse() -> None:
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    y = hadamard(x)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-5)
    assert torch.allclose(hadamard(y), x, atol=1e-5)
    a, b = signs(1, 0, 1000), signs(2, 0, 1000)
    assert set(a.tolist()) == {-1.0, 1.0} and not torch.equal(a, b)
    assert torch.equal(a, signs(1, 0, 1000)) and not torch.equal(a, signs(1, 1, 1000))
    assert abs(float(a.mean())) < 0.1


@pytest.mark.parametrize(("bits", "bound"), [(2, 0.2), (3, 0.07), (4, 0.025)])
@pytest.mark.parametrize("seed", SEEDS)
def test_rotated_quantiser_error_shrinks_with_bits(bits: int, bound: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed, badly scaled entries: the rotation is what makes one step fit a block
    delta = {
        "w": torch.randn(40, 50, generator=g) ** 3,
        "b": torch.randn(300, generator=g) * 1e-3,
    }
    base = {k: torch.zeros_like(v) for k, v in delta.items()}
    codec = resolve_codec(f"rot{bits}:block=256")
    out = codec.decode(codec.encode(delta, base, seed=seed), base)
    for k in delta:
        rel = float((out[k] - delta[k]).pow(2).sum() / delta[k].pow(2).sum())
        assert rel <= bound, (k, rel)


@pytest.mark.parametrize("name", PACKED)
def test_encoding_is_deterministic_and_depends_on_the_seed_where_it_draws(name: str) -> None:
    delta = tiny_delta(1)
    codec = resolve_codec(name)
    assert codec.encode(delta, BASE, seed=5) == codec.encode(delta, BASE, seed=5)
    differs = codec.encode(delta, BASE, seed=5) != codec.encode(delta, BASE, seed=6)
    assert differs == name.startswith(("rot", "sign"))  # they carry the seed they draw from


@pytest.mark.parametrize("name", CODECS)
def test_blobs_stay_within_the_codecs_bound(name: str) -> None:
    delta = tiny_delta(2, scale=100.0)
    for text in (name, f"{name}:density=1", f"{name}:block=8"):
        try:
            codec = resolve_codec(text)
        except CodecNameError:
            continue
        assert len(codec.encode(delta, BASE, seed=1)) <= codec.max_bytes(BASE)


def test_sub_byte_codecs_are_far_smaller_than_fp32() -> None:
    g = torch.Generator().manual_seed(0)
    delta = {"w": torch.randn(64, 256, generator=g), "b": torch.randn(64, generator=g)}
    base = {k: torch.zeros_like(v) for k, v in delta.items()}
    fp32 = len(resolve_codec("fp32").encode(delta, base))
    size = {n: len(resolve_codec(n).encode(delta, base)) / fp32 for n in PACKED}
    assert size["topk-int8"] < 0.03  # 3 % of entries, about 2 bytes each
    assert size["sign1"] < 0.034  # 1 bit + a 16-bit scale per 256
    assert len(resolve_codec("sign1:density=0.85").encode(delta, base)) / fp32 < 0.03
    assert size["rot2"] < size["rot3"] < size["rot4"] < 0.13


# -- error feedback --------------------------------------------------------------------
@pytest.mark.parametrize("name", PACKED)
def test_error_feedback_telescopes(name: str) -> None:
    codec = resolve_codec(name)
    assert codec.error_feedback
    residual = None
    names = fed_back(tiny_delta(0))
    total_true = {k: torch.zeros(tiny_delta(0)[k].shape) for k in names}
    total_sent = {k: torch.zeros_like(v) for k, v in total_true.items()}
    for r in range(6):
        delta = tiny_delta(r)
        sent = encode_with_feedback(codec, delta, BASE, residual, seed=r)
        # what the sender counts as sent is what the receiver decodes
        received = decode_blob(sent.blob, BASE)
        assert all(torch.equal(sent.delta[k], v) for k, v in received.items())
        for k in names:
            total_true[k] += delta[k]
            total_sent[k] += sent.delta[k]
        residual = sent.residual
    assert residual is not None and set(residual) == set(names)  # statistics never fed back
    for k in names:
        assert torch.allclose(total_sent[k] + residual[k], total_true[k], rtol=1e-5, atol=1e-6)


def test_error_feedback_sends_what_one_round_left_out_the_next() -> None:
    codec = resolve_codec("topk-fp16:density=0.01")
    delta = {"w": torch.tensor([4.0, 3.0, 0.0, 0.0])}
    base = {"w": torch.zeros(4)}
    first = encode_with_feedback(codec, delta, base, None)
    assert first.delta["w"].tolist() == [4.0, 0.0, 0.0, 0.0]
    second = encode_with_feedback(codec, {"w": torch.zeros(4)}, base, first.residual)
    assert second.delta["w"].tolist() == [0.0, 3.0, 0.0, 0.0]
    assert second.residual["w"].abs().sum() == 0


def test_a_residual_for_another_model_is_refused() -> None:
    codec = resolve_codec("sign1")
    delta = tiny_delta(0)
    residual = encode_with_feedback(codec, delta, BASE, None).residual
    other = dict(delta, **{"conv.bias": torch.zeros(5)})
    with pytest.raises(CodecError, match=r"residual conv\.bias has shape"):
        encode_with_feedback(codec, other, dict(BASE, **{"conv.bias": torch.zeros(5)}), residual)
    with pytest.raises(CodecError, match="residual entries differ"):
        encode_with_feedback(codec, delta, BASE, {"w": torch.zeros(1)})


# -- malformed fields ------------------------------------------------------------------
REF = {"n": torch.tensor(3, dtype=torch.int64), "w": torch.zeros(2, 5)}
HEAD = fingerprint(layout(REF)) + varints(np.array([6]))  # "n" sorts before "w"; zigzag 3


def f16(*v: float) -> bytes:
    return np.array(v, dtype="<f2").tobytes()


def topk_int8(section: bytes) -> bytes:
    return pack("topk-int8", HEAD + section)


GOOD_TOPK = varints(np.array([2, 1, 3])) + f16(0.5) + bytes([1, 2])  # indices 1, 4


def sign1(section: bytes, log2: int = 3) -> bytes:
    """A sign1 blob of REF, every entry sent (keep 0), blocks of 2**log2."""
    return pack("sign1", HEAD[:4] + u8(log2) + u8(0) + u32(1) + HEAD[4:] + section)


def rot2(section: bytes) -> bytes:
    return pack("rot2", HEAD[:4] + u8(3) + u32(1) + HEAD[4:] + section)


def test_hand_built_blobs_decode_as_documented() -> None:
    out = decode_blob(topk_int8(GOOD_TOPK), REF)
    assert out["w"].reshape(-1).tolist() == [0, 0.5, 0, 0, 1.0, 0, 0, 0, 0, 0]
    assert torch.equal(out["n"], REF["n"])
    signs_ = decode_blob(sign1(f16(2, 1) + bytes([0b00000101, 0b10])), REF)["w"]
    assert signs_.reshape(-1).tolist() == [2, -2, 2, -2, -2, -2, -2, -2, -1, 1]
    skipped = decode_blob(sign1(f16(0, 1) + bytes([0b01])), REF)["w"]  # first block: no bits
    assert skipped.reshape(-1).tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, -1]


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (topk_int8(varints(np.array([11])) + bytes(11)), "11 indices for 10 entries"),
        (topk_int8(varints(np.array([2, 1, 0])) + f16(1) + bytes(2)), "not strictly increasing"),
        (topk_int8(varints(np.array([2, 1, 9])) + f16(1) + bytes(2)), "index 10 is beyond"),
        (topk_int8(varints(np.array([1, 1])) + f16(1) + bytes([0x80])), "-128"),
        (topk_int8(varints(np.array([1, 1])) + f16(float("nan")) + bytes(1)), "NaN"),
        (topk_int8(varints(np.array([1, 1])) + f16(-1) + bytes(1)), "negative"),
        (topk_int8(varints(np.array([1, 1])) + f16(1)), "needs 1 bytes, 0 left"),
        (topk_int8(GOOD_TOPK + b"\0"), "1 bytes after the last section"),
        (topk_int8(bytes([1, 0x81, 0x00]) + f16(1) + bytes(1)), "not minimally encoded"),
        (topk_int8(bytes([1, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F]) + f16(1) + bytes(1)), "beyond 2"),
        (topk_int8(bytes([1, 0x81])), "do not fit"),
        (topk_int8(bytes([0x85, 0x80, 0x80, 0x80, 0x01])), "indices for 10 entries"),
        (pack("topk-fp16", HEAD + varints(np.array([1, 0])) + f16(float("inf"))), "infinite"),
        (pack("topk-int8", fingerprint(layout({"w": torch.zeros(9)})) + GOOD_TOPK), "another"),
        (sign1(b"", log2=2), "log2\\(block\\) 2 is outside"),
        (sign1(b"", log2=13), "log2\\(block\\) 13 is outside"),
        (sign1(f16(1, -1) + bytes(2)), "negative"),
        (sign1(f16(1, 1) + bytes([0, 4])), "unused bits"),
        (sign1(f16(0, 1) + bytes([4])), "unused bits"),  # 2 signs: the first block is out
        (sign1(f16(1, 1) + bytes(1)), "needs 2 bytes"),
        (rot2(f16(1, float("nan")) + bytes(3)), "NaN"),
        (rot2(f16(1, 1) + bytes(2) + b"\x10"), "unused"),
        (rot2(f16(1, 1) + bytes(5)), "after the last"),
        (pack("rot2", HEAD[:4] + u8(3)), "seed needs 4 bytes"),
        (pack("sign1", HEAD[:4] + u8(3) + u8(0)), "seed needs 4 bytes"),
        (pack("sign1", HEAD[:4] + u8(3) + u8(0) + u32(1) + bytes([0x80])), "do not fit"),
        (pack("nope", HEAD), "unknown codec 'nope'"),
        (b"TKP\x02\x05sign1" + HEAD, "unknown version"),
        (b"TKP\x01\x40sign1" + HEAD, "malformed codec name"),
        (b"TKP\x01", "truncated"),
        (b"garbage!", "too short|does not fit"),
    ],
)
def test_decoders_refuse_every_malformed_field(blob: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode_blob(blob, REF)


STATS = {"bn.running_var": torch.ones(2), "m": torch.zeros(1, dtype=torch.int8)}


def stats_blob(section: bytes, m: int | None = 0) -> bytes:
    head = fingerprint(layout(STATS)) + u8(3) + u8(0) + u32(0)
    return pack("sign1", head + section + (b"" if m is None else varints(np.array([m]))))


def test_statistics_and_integers_refuse_bad_fields() -> None:
    out = decode_blob(stats_blob(f16(0.5) + bytes([0x59]), m=5), STATS)  # codes 9, 5
    assert torch.allclose(out["bn.running_var"], torch.expm1(torch.tensor([1.0, -1.0])))
    assert out["m"].tolist() == [-3]  # zigzag 5
    for section, m, match in [
        (f16(float("inf")) + bytes(1), 0, "NaN or infinite"),
        (f16(-0.5) + bytes(1), 0, "negative"),
        (f16(0.5) + bytes([0xF0]), 0, "statistic code 15"),
        (f16(0.5), None, "needs 1 bytes, 0 left"),
        (f16(0.5) + bytes(1), 256, r"outside torch\.int8's range"),
    ]:
        with pytest.raises(CodecError, match=match):
            decode_blob(stats_blob(section, m), STATS)
    ref = {"d": torch.zeros(2, dtype=torch.bool)}
    head = fingerprint(layout(ref)) + u8(3) + u8(0) + u32(0)
    bools = pack("sign1", head + varints(np.array([0, 2])))
    assert decode_blob(bools, ref)["d"].tolist() == [False, True]
    with pytest.raises(CodecError, match=r"outside torch\.bool's range"):
        decode_blob(pack("sign1", head + varints(np.array([4, 0]))), ref)


def test_layout_mismatch_is_its_own_error_and_caps_come_first() -> None:
    blob = resolve_codec("sign1").encode(tiny_delta(0), BASE)
    other = dict(BASE, extra=torch.zeros(1))
    with pytest.raises(LayoutMismatch):
        decode_blob(blob, other)
    with pytest.raises(CodecError, match="exceeds the 10-byte cap"):
        decode_blob(blob, BASE, max_bytes=10)
    with pytest.raises(CodecError, match="not a rot2 blob"):
        resolve_codec("rot2").decode(blob, BASE)
    with pytest.raises(CodecError, match="not a fp16 blob"):
        resolve_codec("fp16").decode(resolve_codec("int8").encode(tiny_delta(0), BASE), BASE)


def test_encoders_refuse_what_they_cannot_represent() -> None:
    bad = {"w": torch.tensor([[1.0, float("nan")]])}
    base = {"w": torch.zeros(1, 2)}
    for name in PACKED:
        with pytest.raises(CodecError, match="non-finite"):
            resolve_codec(name).encode(bad, base)
    big = {"w": torch.tensor([[1e6]])}
    for name in ("topk-fp16:density=1", "sign1", "rot3"):
        with pytest.raises(CodecError, match="float16 range"):
            resolve_codec(name).encode(big, {"w": torch.zeros(1, 1)})
    with pytest.raises(CodecError, match="complex"):
        resolve_codec("sign1").encode({"w": torch.zeros(2, dtype=torch.complex64)}, {})
