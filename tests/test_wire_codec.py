"""Properties of the tensor codec on tiny tensors."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from takfl.wire.codec import (
    SCALE_SUFFIX,
    apply_delta,
    decode_state,
    encode_state,
    make_delta,
    max_encoded_bytes,
)
from takfl.wire.errors import CodecError

torch.set_num_threads(1)
SEEDS = range(5)


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g) * (seed + 1),
        "conv.bias": torch.randn(4, generator=g) * 1e-3,
        "bn.running_var": torch.rand(4, generator=g) + 0.5,
        "bn.num_batches_tracked": torch.tensor(17 + seed, dtype=torch.int64),
        "mask": torch.rand(5, generator=g) > 0.5,
        "scalar": torch.tensor(0.25),
    }


@pytest.mark.parametrize("seed", SEEDS)
def test_fp32_round_trip_is_exact(seed: int) -> None:
    state = tiny_state(seed)
    out = decode_state(encode_state(state, "fp32"))
    assert set(out) == set(state)
    for k, v in state.items():
        assert out[k].dtype == v.dtype
        assert torch.equal(out[k], v)


@pytest.mark.parametrize("seed", SEEDS)
def test_fp16_round_trip_within_half_precision(seed: int) -> None:
    state = tiny_state(seed)
    out = decode_state(encode_state(state, "fp16"))
    for k, v in state.items():
        if v.is_floating_point():
            assert out[k].dtype == torch.float32
            bound = v.abs() * 2.0**-11 + 2.0**-24
            assert bool(((out[k] - v).abs() <= bound).all()), k
        else:
            assert torch.equal(out[k], v)


@pytest.mark.parametrize("seed", SEEDS)
def test_int8_round_trip_within_half_a_step(seed: int) -> None:
    state = tiny_state(seed)
    out = decode_state(encode_state(state, "int8"))
    for k, v in state.items():
        if v.is_floating_point():
            step = float(v.abs().max()) / 127
            assert out[k].dtype == torch.float32
            assert float((out[k] - v).abs().max()) <= step / 2 * (1 + 1e-5) + 1e-12, k
        else:
            assert out[k].dtype == v.dtype
            assert torch.equal(out[k], v)


def test_int8_stores_scale_alongside_each_float_tensor() -> None:
    raw = st_load(encode_state({"w": torch.tensor([1.0, -2.0, 0.5]), "n": torch.tensor(3)}, "int8"))
    assert raw["w"].dtype == torch.int8
    assert raw["w"].tolist() == [64, -127, 32]  # round(x / (2/127))
    assert float(raw["w" + SCALE_SUFFIX]) == pytest.approx(2.0 / 127)
    assert "n" + SCALE_SUFFIX not in raw


def test_int8_zero_tensor_decodes_to_zero() -> None:
    out = decode_state(encode_state({"z": torch.zeros(3, 2)}, "int8"))
    assert torch.equal(out["z"], torch.zeros(3, 2))


def test_compressed_sizes_shrink() -> None:
    state = {"w": torch.randn(256, 256)}
    sizes = {c: len(encode_state(state, c)) for c in ("fp32", "fp16", "int8")}
    assert sizes["fp16"] < 0.51 * sizes["fp32"]
    assert sizes["int8"] < 0.26 * sizes["fp32"]
    assert all(n <= max_encoded_bytes(state) for n in sizes.values())


@pytest.mark.parametrize("seed", SEEDS)
def test_delta_then_apply_reconstructs_trained(seed: int) -> None:
    base = tiny_state(seed)
    trained = {
        k: (v + 0.01 * torch.randn_like(v))
        if v.is_floating_point()
        else v + 3
        if v.dtype == torch.int64
        else ~v
        for k, v in base.items()
    }
    delta = make_delta(trained, base)
    assert torch.equal(delta["bn.num_batches_tracked"], trained["bn.num_batches_tracked"])
    rebuilt = apply_delta(base, decode_state(encode_state(delta, "fp32")))
    for k, v in trained.items():
        assert rebuilt[k].dtype == v.dtype
        if v.is_floating_point():
            torch.testing.assert_close(rebuilt[k], v, rtol=0, atol=1e-6)
        else:
            assert torch.equal(rebuilt[k], v)


def test_make_delta_refuses_mismatched_states() -> None:
    base = tiny_state(0)
    with pytest.raises(CodecError, match="missing"):
        make_delta({k: v for k, v in base.items() if k != "conv.bias"}, base)
    bad = dict(base, **{"conv.bias": torch.zeros(5)})
    with pytest.raises(CodecError, match="shape"):
        apply_delta(base, bad)


def test_encode_refuses_what_it_cannot_represent() -> None:
    with pytest.raises(CodecError, match="float16 range"):
        encode_state({"w": torch.tensor([1e6])}, "fp16")
    with pytest.raises(CodecError, match="non-finite"):
        encode_state({"w": torch.tensor([float("nan")])}, "int8")
    with pytest.raises(CodecError, match="reserved"):
        encode_state({"w" + SCALE_SUFFIX: torch.zeros(1)}, "fp32")
    with pytest.raises(CodecError, match="unknown compression"):
        encode_state({"w": torch.zeros(1)}, "bf16")


def test_nan_survives_fp32_and_fp16_for_the_validator_to_see() -> None:
    for c in ("fp32", "fp16"):
        out = decode_state(encode_state({"w": torch.tensor([1.0, float("nan")])}, c))
        assert bool(torch.isnan(out["w"][1]))


def _with_header(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + body


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"", "too short"),
        (b"\x00" * 7, "too short"),
        (struct.pack("<Q", 1 << 40) + b"{}", "does not fit"),
        (_with_header(b"not json"), "not JSON"),
        (_with_header(b"[1, 2]"), "not a JSON object"),
        (st_save({"w": torch.zeros(2)}), "not a takfl codec"),
        (
            st_save(
                {"w": torch.zeros(2, dtype=torch.float64)},
                metadata={"takfl.codec": "1:fp32"},
            ),
            "dtype F64",
        ),
        (
            st_save(
                {"w": torch.zeros(2, dtype=torch.int8), "x" + SCALE_SUFFIX: torch.tensor(1.0)},
                metadata={"takfl.codec": "1:int8"},
            ),
            "stray",
        ),
        (
            st_save(
                {
                    "w": torch.zeros(2, dtype=torch.int8),
                    "w" + SCALE_SUFFIX: torch.tensor(float("nan")),
                },
                metadata={"takfl.codec": "1:int8"},
            ),
            "invalid int8 scale",
        ),
        (
            st_save({"w": torch.zeros(2)}, metadata={"takfl.codec": "1:zip"}),
            "unknown compression",
        ),
        (
            st_save({"w": torch.zeros(2)}, metadata={"takfl.codec": "2:fp32"}),
            "not a takfl codec",
        ),
    ],
    ids=[
        "empty",
        "short",
        "huge-header",
        "not-json",
        "not-object",
        "foreign",
        "f64",
        "stray-scale",
        "nan-scale",
        "unknown-mode",
        "future-version",
    ],
)
def test_decode_refuses_malformed_blobs(blob: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode_state(blob)


@pytest.mark.parametrize("compression", ["fp32", "fp16", "int8"])
def test_encoding_is_deterministic(compression: str) -> None:
    state = tiny_state(0)
    blobs = {encode_state(state, compression) for _ in range(20)}
    assert len(blobs) == 1  # same state, same bytes, same digest


def test_decode_refuses_truncated_and_oversized_blobs() -> None:
    blob = encode_state(tiny_state(0), "fp32")
    with pytest.raises(CodecError):
        decode_state(blob[:-3])
    with pytest.raises(CodecError, match="cap"):
        decode_state(blob, max_bytes=len(blob) - 1)
    assert set(decode_state(blob, max_bytes=len(blob))) == set(tiny_state(0))
