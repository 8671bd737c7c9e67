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
from takfl.wire.packing import fingerprint, layout, pack, raw, u8, u64, varints
from takfl.wire.rotation import hadamard, signs

torch.set_num_threads(1)
SEEDS = range(4)
PACKED = ("topk-int8", "topk-fp16", "sign1", "rot2", "rot3", "rot4")


def tiny_delta(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g) * scale,
        "conv.bias": torch.randn(4, generator=g) * 1e-3,
        "bn.running_var": torch.rand(4, generator=g) - 0.5,
        "bn.num_batches_tracked": torch.tensor(17 + seed, dtype=torch.int64),
        "mask": torch.rand(5, generator=g) > 0.5,
        "scalar": torch.tensor(0.25),
        "fc.weight": torch.randn(10, 70, generator=g) * 0.01,
    }


def sq(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor] | None = None) -> float:
    """Sum of squares over floating entries of ``a`` (or of ``a - b``)."""
    return sum(
        float((t - (b[k] if b is not None else 0)).double().pow(2).sum())
        for k, t in a.items()
        if t.is_floating_point()
    )


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
        ("sign1:density=0.1", "sign1 takes block"),
        ("topk-fp16:density=0.1,density=0.2", "given twice"),
    ]:
        with pytest.raises(CodecNameError, match=fragment):
            parse_codec(bad)


def test_choice_text_is_canonical_and_parses_back() -> None:
    for text in ("fp16", "topk-int8:density=0.02", "sign1:block=128", "rot3:block=256"):
        choice = parse_codec(text)
        assert str(choice) == text
        assert parse_codec(str(choice)) == choice
    assert str(parse_codec("rot2")) == "rot2:block=256"
    assert parse_codec(" topk-fp16 : density = 0.5 ") == CodecChoice("topk-fp16", density=0.5)


@pytest.mark.parametrize("name", ["fp32", "fp16", "int8"])
def test_tensor_codecs_are_byte_for_byte_encode_state(name: str) -> None:
    delta = tiny_delta(0)
    codec = resolve_codec(name)
    blob = codec.encode(delta)
    assert blob == encode_state(delta, name)
    assert not codec.error_feedback
    out = codec.decode(blob, delta)
    assert set(out) == set(delta)


# -- round trips -----------------------------------------------------------------------
@pytest.mark.parametrize("name", PACKED)
@pytest.mark.parametrize("seed", SEEDS)
def test_non_floating_entries_come_back_exactly(name: str, seed: int) -> None:
    delta = tiny_delta(seed)
    out = decode_blob(resolve_codec(name).encode(delta, seed=seed), delta)
    assert set(out) == set(delta)
    for k, t in delta.items():
        if t.is_floating_point():
            assert out[k].dtype == torch.float32 and out[k].shape == t.shape
        else:
            assert out[k].dtype == t.dtype and torch.equal(out[k], t)


@pytest.mark.parametrize("name", PACKED)
@pytest.mark.parametrize("seed", SEEDS)
def test_vectors_go_as_float16(name: str, seed: int) -> None:
    """Biases and normalisation statistics are not compressed: a running variance stays
    within float16 rounding of what was trained, never negative."""
    delta = tiny_delta(seed)
    out = decode_blob(resolve_codec(name).encode(delta, seed=seed), delta)
    for k, t in delta.items():
        if t.is_floating_point() and t.dim() < 2:
            bound = t.abs() * 2.0**-11 + 2.0**-24
            assert bool(((out[k] - t).abs() <= bound).all()), k


@pytest.mark.parametrize("name", PACKED)
def test_zero_delta_decodes_to_zero(name: str) -> None:
    delta = {
        k: torch.zeros_like(t) if t.is_floating_point() else t for k, t in tiny_delta(0).items()
    }
    out = decode_blob(resolve_codec(name).encode(delta), delta)
    assert sq(out) == 0.0


@pytest.mark.parametrize("values", ["int8", "fp16"])
@pytest.mark.parametrize("seed", SEEDS)
def test_topk_sends_the_largest_entries_of_each_tensor(values: str, seed: int) -> None:
    delta = tiny_delta(seed)
    density = 0.1
    out = resolve_codec(f"topk-{values}:density={density}").decode(
        resolve_codec(f"topk-{values}:density={density}").encode(delta), delta
    )
    for k, t in delta.items():
        if t.dim() < 2:
            continue
        x, d = t.reshape(-1), out[k].reshape(-1)
        k_sent = min(math.ceil(density * x.numel()), int((x != 0).sum()))
        sent = torch.zeros(x.numel(), dtype=torch.bool)
        sent[torch.argsort(x.abs(), descending=True, stable=True)[:k_sent]] = True
        # nothing left out is larger than anything sent, and what is left out is zero
        left_out = x[~sent].abs()
        assert left_out.numel() == 0 or float(left_out.max()) <= float(x[sent].abs().min())
        assert not bool(d[~sent].any())
        bound = (
            x[sent].abs().max() / 254 * (1 + 1e-5)
            if values == "int8"
            else x[sent].abs() * 2.0**-11 + 2.0**-24
        )
        assert bool(((d[sent] - x[sent]).abs() <= bound).all()), k


@pytest.mark.parametrize("seed", SEEDS)
def test_sign_sends_block_mean_magnitude_with_each_sign(seed: int) -> None:
    delta = tiny_delta(seed)
    block = 8
    out = resolve_codec(f"sign1:block={block}").decode(
        resolve_codec(f"sign1:block={block}").encode(delta), delta
    )
    for k, t in delta.items():
        if t.dim() < 2:
            continue
        x, d = t.reshape(-1).double(), out[k].reshape(-1).double()
        assert bool(((d >= 0) == (x >= 0)).all())
        for start in range(0, x.numel(), block):
            mean = float(x[start : start + block].abs().mean())
            assert float(d[start : start + block].abs().max()) == pytest.approx(mean, rel=1e-3)
    # the mean-magnitude scale never makes the error worse than sending nothing
    assert sq(delta, out) <= sq(delta) * (1 + 1e-3)


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
        "b": torch.randn(3, 100, generator=g) * 1e-3,
    }
    codec = resolve_codec(f"rot{bits}:block=256")
    out = codec.decode(codec.encode(delta, seed=seed), delta)
    for k in delta:
        rel = float((out[k] - delta[k]).pow(2).sum() / delta[k].pow(2).sum())
        assert rel <= bound, (k, rel)


@pytest.mark.parametrize("name", PACKED)
def test_encoding_is_deterministic_and_rot_depends_on_its_seed(name: str) -> None:
    delta = tiny_delta(1)
    codec = resolve_codec(name)
    assert codec.encode(delta, seed=5) == codec.encode(delta, seed=5)
    assert (codec.encode(delta, seed=5) != codec.encode(delta, seed=6)) == name.startswith("rot")


@pytest.mark.parametrize("name", CODECS)
def test_blobs_stay_within_the_codecs_bound(name: str) -> None:
    delta = tiny_delta(2, scale=100.0)
    for text in (name, f"{name}:density=1", f"{name}:block=8"):
        try:
            codec = resolve_codec(text)
        except CodecNameError:
            continue
        assert len(codec.encode(delta, seed=1)) <= codec.max_bytes(delta)


def test_sub_byte_codecs_are_far_smaller_than_fp32() -> None:
    g = torch.Generator().manual_seed(0)
    delta = {"w": torch.randn(64, 256, generator=g)}
    fp32 = len(resolve_codec("fp32").encode(delta))
    size = {n: len(resolve_codec(n).encode(delta)) / fp32 for n in PACKED}
    assert size["topk-int8"] < 0.03  # 3 % of entries, about 2 bytes each
    assert size["sign1"] < 0.034  # 1 bit + a 16-bit scale per 256
    assert size["rot2"] < size["rot3"] < size["rot4"] < 0.13


# -- error feedback --------------------------------------------------------------------
@pytest.mark.parametrize("name", PACKED)
def test_error_feedback_telescopes(name: str) -> None:
    codec = resolve_codec(name)
    assert codec.error_feedback
    residual = None
    total_true = {
        k: torch.zeros(t.shape) for k, t in tiny_delta(0).items() if t.is_floating_point()
    }
    total_sent = {k: torch.zeros_like(v) for k, v in total_true.items()}
    for r in range(6):
        delta = tiny_delta(r)
        sent = encode_with_feedback(codec, delta, residual, seed=r)
        # what the sender counts as sent is what the receiver decodes
        assert all(torch.equal(sent.delta[k], v) for k, v in decode_blob(sent.blob, delta).items())
        for k in total_true:
            total_true[k] += delta[k]
            total_sent[k] += sent.delta[k]
        residual = sent.residual
    assert residual is not None
    for k in total_true:
        assert torch.allclose(total_sent[k] + residual[k], total_true[k], rtol=1e-5, atol=1e-6), k


def test_error_feedback_sends_what_one_round_left_out_the_next() -> None:
    codec = resolve_codec("topk-fp16:density=0.01")
    delta = {"w": torch.tensor([[4.0, 3.0], [0.0, 0.0]])}
    first = encode_with_feedback(codec, delta, None)
    assert first.delta["w"].tolist() == [[4.0, 0.0], [0.0, 0.0]]
    zero = {"w": torch.zeros(2, 2)}
    second = encode_with_feedback(codec, zero, first.residual)
    assert second.delta["w"].tolist() == [[0.0, 3.0], [0.0, 0.0]]
    assert second.residual["w"].abs().sum() == 0


def test_a_residual_for_another_model_is_refused() -> None:
    codec = resolve_codec("sign1")
    delta = tiny_delta(0)
    residual = encode_with_feedback(codec, delta, None).residual
    other = dict(delta, **{"conv.bias": torch.zeros(5)})
    with pytest.raises(CodecError, match=r"residual conv\.bias has shape"):
        encode_with_feedback(codec, other, residual)
    with pytest.raises(CodecError, match="residual entries differ"):
        encode_with_feedback(codec, delta, {"w": torch.zeros(1)})


# -- malformed fields ------------------------------------------------------------------
REF = {"n": torch.tensor(3, dtype=torch.int64), "w": torch.zeros(2, 5)}
HEAD = fingerprint(layout(REF)) + raw(REF["n"])  # "n" sorts before "w"
VEC = {"b": torch.zeros(2)}  # a vector: float16 values in every packed codec


def f16(*v: float) -> bytes:
    return np.array(v, dtype="<f2").tobytes()


def f32(*v: float) -> bytes:
    return np.array(v, dtype="<f4").tobytes()


def topk_int8(section: bytes) -> bytes:
    return pack("topk-int8", HEAD + section)


GOOD_TOPK = varints(np.array([2, 1, 3])) + f32(0.5) + bytes([1, 2])  # indices 1, 4


def test_hand_built_blobs_decode_as_documented() -> None:
    out = decode_blob(topk_int8(GOOD_TOPK), REF)
    assert out["w"].reshape(-1).tolist() == [0, 0.5, 0, 0, 1.0, 0, 0, 0, 0, 0]
    assert torch.equal(out["n"], REF["n"])
    sign = pack(
        "sign1",
        fingerprint(layout(REF)) + u8(3) + raw(REF["n"]) + f16(2, 1) + bytes([0b00000101, 0b10]),
    )
    assert decode_blob(sign, REF)["w"].reshape(-1).tolist() == [2, -2, 2, -2, -2, -2, -2, -2, -1, 1]


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (topk_int8(varints(np.array([11])) + bytes(11)), "11 indices for 10 entries"),
        (topk_int8(varints(np.array([2, 1, 0])) + f32(1) + bytes(2)), "not strictly increasing"),
        (topk_int8(varints(np.array([2, 1, 9])) + f32(1) + bytes(2)), "index 10 is beyond"),
        (topk_int8(varints(np.array([1, 1])) + f32(1) + bytes([0x80])), "-128"),
        (topk_int8(varints(np.array([1, 1])) + f32(float("nan")) + bytes(1)), "NaN"),
        (topk_int8(varints(np.array([1, 1])) + f32(-1) + bytes(1)), "negative"),
        (topk_int8(varints(np.array([1, 1])) + f32(1)), "needs 1 bytes, 0 left"),
        (topk_int8(GOOD_TOPK + b"\0"), "1 bytes after the last section"),
        (topk_int8(bytes([1, 0x81, 0x00]) + f32(1) + bytes(1)), "not minimally encoded"),
        (topk_int8(bytes([1, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]) + f32(1) + bytes(1)), "beyond 2"),
        (topk_int8(bytes([1, 0x81])), "do not fit"),
        (pack("topk-fp16", HEAD + varints(np.array([1, 0])) + f16(float("inf"))), "infinite"),
        (
            pack("topk-int8", fingerprint(layout({"w": torch.zeros(9)})) + GOOD_TOPK),
            "another model",
        ),
        (pack("sign1", HEAD[:8] + u8(2)), "log2\\(block\\) 2 is outside"),
        (pack("sign1", HEAD[:8] + u8(13)), "log2\\(block\\) 13 is outside"),
        (pack("sign1", HEAD[:8] + u8(3) + HEAD[8:] + f16(1, -1) + bytes(2)), "negative"),
        (pack("sign1", HEAD[:8] + u8(3) + HEAD[8:] + f16(1, 1) + bytes([0, 4])), "unused bits"),
        (pack("sign1", HEAD[:8] + u8(3) + HEAD[8:] + f16(1, 1) + bytes(1)), "needs 2 bytes"),
        (
            pack("rot2", HEAD[:8] + u8(3) + u64(1) + HEAD[8:] + f16(1, float("nan")) + bytes(4)),
            "NaN",
        ),
        (
            pack("rot2", HEAD[:8] + u8(3) + u64(1) + HEAD[8:] + f16(1, 1) + bytes(2) + b"\x10"),
            "unused",
        ),
        (
            pack("rot2", HEAD[:8] + u8(3) + u64(1) + HEAD[8:] + f16(1, 1) + bytes(5)),
            "after the last",
        ),
        (pack("rot2", HEAD[:8] + u8(3)), "seed needs 8 bytes"),
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


def test_vector_entries_refuse_non_finite_and_short_values() -> None:
    head = fingerprint(layout(VEC)) + u8(3)
    assert decode_blob(pack("sign1", head + f16(1, -2)), VEC)["b"].tolist() == [1, -2]
    with pytest.raises(CodecError, match="NaN or infinite"):
        decode_blob(pack("sign1", head + f16(1, float("nan"))), VEC)
    with pytest.raises(CodecError, match="needs 4 bytes, 2 left"):
        decode_blob(pack("sign1", head + f16(1)), VEC)


def test_layout_mismatch_is_its_own_error_and_caps_come_first() -> None:
    blob = resolve_codec("sign1").encode(tiny_delta(0))
    other = dict(tiny_delta(0), extra=torch.zeros(1))
    with pytest.raises(LayoutMismatch):
        decode_blob(blob, other)
    with pytest.raises(CodecError, match="exceeds the 10-byte cap"):
        decode_blob(blob, tiny_delta(0), max_bytes=10)
    with pytest.raises(CodecError, match="not a rot2 blob"):
        resolve_codec("rot2").decode(blob, tiny_delta(0))
    with pytest.raises(CodecError, match="not a fp16 blob"):
        resolve_codec("fp16").decode(resolve_codec("int8").encode(tiny_delta(0)), tiny_delta(0))


def test_booleans_other_than_zero_and_one_are_refused() -> None:
    ref = {"m": torch.zeros(2, dtype=torch.bool)}
    good = pack("sign1", fingerprint(layout(ref)) + u8(3) + bytes([0, 1]))
    assert decode_blob(good, ref)["m"].tolist() == [False, True]
    with pytest.raises(CodecError, match="boolean bytes"):
        decode_blob(pack("sign1", fingerprint(layout(ref)) + u8(3) + bytes([0, 2])), ref)


def test_encoders_refuse_what_they_cannot_represent() -> None:
    bad = {"w": torch.tensor([[1.0, float("nan")]])}
    for name in PACKED:
        with pytest.raises(CodecError, match="non-finite"):
            resolve_codec(name).encode(bad)
    with pytest.raises(CodecError, match="float16 range"):
        resolve_codec("topk-fp16:density=1").encode({"w": torch.tensor([[1e6]])})
    with pytest.raises(CodecError, match="float16 range"):
        resolve_codec("sign1").encode({"b": torch.tensor([1e6])})
    with pytest.raises(CodecError, match="complex"):
        resolve_codec("sign1").encode({"w": torch.zeros(2, dtype=torch.complex64)})
