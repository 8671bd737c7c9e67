"""Tensor dicts to bytes and back (safetensors), with compressed update deltas.

Encoding (``encode_state``) stores a safetensors blob whose metadata is the single
entry ``{"takfl.codec": "1:<mode>"}`` (one entry: safetensors writes metadata in hash
order, so a single key keeps the bytes, hence the digest, deterministic). Floating
tensors are stored

- ``fp32``: as float32 (exact for float32 input);
- ``fp16``: as float16 (relative error <= 2**-11 in the normal range, absolute
  <= 2**-25 below it); finite values beyond +-65504 are refused, not clipped;
- ``int8``: per-tensor symmetric quantisation. With ``s = max|x| / 127`` the
  tensor is stored as ``q = round(x / s)`` (int8 in [-127, 127]) plus the
  float32 scalar ``s`` under the name ``<name>.__scale__``; decoding gives
  ``q * s``, so the error per element is at most ``s / 2 = max|x| / 254``.
  An all-zero tensor has ``s = 0``. Non-finite values are refused.

Non-floating tensors (integer counters such as BatchNorm ``num_batches_tracked``,
boolean masks) are stored unchanged in every mode and come back bit-exact.
``decode_state`` returns float32 for every floating tensor.

Deltas: ``make_delta(trained, base)`` is ``trained - base`` (in float32) for
floating tensors; non-floating tensors are not differenced, the delta carries
the trained value and ``apply_delta`` takes it as is.

Only ``safetensors`` is used on received bytes: never pickle, never ``torch.load``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from takfl.state import State, StateView
from takfl.wire.errors import CodecError
from takfl.wire.messages import COMPRESSIONS

CODEC_KEY = "takfl.codec"
CODEC_VERSION = "1"
SCALE_SUFFIX = ".__scale__"
FP16_MAX = 65504.0
INT8_MAX = 127
MAX_HEADER_BYTES = 16 * 1024 * 1024  # safetensors JSON header cap when decoding

# safetensors dtype codes accepted per role when decoding
_FLOAT_CODE = {"fp32": "F32", "fp16": "F16", "int8": "I8"}
_EXACT_CODES = frozenset({"I64", "I32", "I16", "I8", "U8", "BOOL"})


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def _check_compression(compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise CodecError(f"unknown compression {compression!r}; expected one of {COMPRESSIONS}")


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-tensor int8: returns ``(q, scale)`` with ``x ~= q * scale``.

    Args: x: float tensor of any shape, all finite.
    Returns: q: int8 tensor of x's shape, in [-127, 127]; scale: float32 scalar >= 0.
    """
    x32 = x.detach().to(torch.float32)
    amax = x32.abs().max() if x32.numel() else torch.tensor(0.0)
    scale = (amax / INT8_MAX).to(torch.float32).reshape(())
    if float(scale) == 0.0:
        return torch.zeros_like(x32, dtype=torch.int8), scale
    q = torch.round(x32 / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def _encode_float(name: str, t: torch.Tensor, compression: str) -> State:
    x = t.detach().to("cpu")
    if compression == "fp32":
        return {name: x.to(torch.float32).contiguous()}
    finite = torch.isfinite(x)
    if compression == "fp16":
        if bool((x[finite].abs() > FP16_MAX).any()):
            raise CodecError(f"{name}: values beyond the float16 range; encode it with fp32")
        return {name: x.to(torch.float16).contiguous()}
    if not bool(finite.all()):
        raise CodecError(f"{name}: non-finite values cannot be int8-quantised")
    q, scale = quantize_int8(x)
    return {name: q.contiguous(), name + SCALE_SUFFIX: scale}


def encode_state(tensors: StateView, compression: str) -> bytes:
    """Encode a tensor dict as safetensors bytes with ``compression`` (fp32, fp16 or int8).

    Args:
        tensors: name -> tensor (any device; floating tensors are compressed,
            others carried exactly). Names must not end with ``.__scale__``.
        compression: "fp32", "fp16" or "int8" (see the module docstring).
    Returns:
        the blob; decode with :func:`decode_state`.
    """
    _check_compression(compression)
    out: State = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise CodecError(f"{name}: expected a tensor, got {type(t).__name__}")
        if name.endswith(SCALE_SUFFIX):
            raise CodecError(f"{name}: tensor names ending with {SCALE_SUFFIX!r} are reserved")
        if _is_float(t):
            out.update(_encode_float(name, t, compression))
        elif t.dtype.is_complex:
            raise CodecError(f"{name}: complex tensors are not supported")
        else:
            out[name] = t.detach().to("cpu").contiguous()
    return st_save(out, metadata={CODEC_KEY: codec_tag(compression)})


def codec_tag(compression: str) -> str:
    """The metadata value naming the codec version and compression, e.g. ``"1:fp16"``."""
    return f"{CODEC_VERSION}:{compression}"


def read_header(data: bytes) -> tuple[dict[str, str], dict[str, dict[str, object]]]:
    """Parse the safetensors JSON header: ``(metadata, {name: {"dtype", "shape", ...}})``.

    Raises :class:`CodecError` when the header is truncated, oversized or not a JSON object.
    """
    if len(data) < 8:
        raise CodecError(f"{len(data)} bytes is too short for a safetensors blob")
    (n,) = struct.unpack_from("<Q", data)
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise CodecError(f"safetensors header of {n} bytes does not fit the blob")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CodecError(f"safetensors header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise CodecError("safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise CodecError("safetensors header has a malformed entry")
    return meta, header


def blob_compression(data: bytes) -> str | None:
    """The compression a blob's codec tag names (``"fp16"`` for ``"1:fp16"``), or None
    when ``data`` is not a blob of this codec version (:func:`decode_state` then says why)."""
    try:
        meta, _ = read_header(data)
    except CodecError:
        return None
    version, _, compression = str(meta.get(CODEC_KEY, "")).partition(":")
    return compression if version == CODEC_VERSION and compression in COMPRESSIONS else None


def _check_layout(compression: str, entries: Mapping[str, Mapping[str, object]]) -> None:
    """Every tensor has a dtype its compression mode can produce; int8 scales pair up."""
    float_code = _FLOAT_CODE[compression]
    for name, entry in entries.items():
        code = entry.get("dtype")
        if name.endswith(SCALE_SUFFIX):
            base = name[: -len(SCALE_SUFFIX)]
            if compression != "int8" or base not in entries or code != "F32" or entry.get("shape"):
                raise CodecError(f"{name}: stray or malformed scale tensor")
            if entries[base].get("dtype") != "I8":
                raise CodecError(f"{name}: scale for a tensor that is not int8")
        elif code != float_code and code not in _EXACT_CODES:
            raise CodecError(f"{name}: dtype {code} is not valid in a {compression} blob")


def decode_state(data: bytes, *, max_bytes: int | None = None) -> State:
    """Decode :func:`encode_state` bytes; floating tensors come back as float32.

    Args:
        data: the blob.
        max_bytes: refuse blobs larger than this before parsing anything.
    Raises:
        CodecError: oversized, not safetensors, not written by this codec, or inconsistent.
    """
    if not isinstance(data, bytes | bytearray):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise CodecError(f"blob of {len(data)} bytes exceeds the {max_bytes}-byte cap")
    meta, entries = read_header(data)
    tag = meta.get(CODEC_KEY)
    version, _, compression = tag.partition(":") if isinstance(tag, str) else ("", "", "")
    if version != CODEC_VERSION or len(meta) != 1:
        raise CodecError(f"not a takfl codec v{CODEC_VERSION} blob (metadata {meta!r:.200})")
    _check_compression(compression)
    _check_layout(compression, entries)
    try:
        raw = st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CodecError(f"not a valid safetensors blob ({e})") from e
    out: State = {}
    for name, t in raw.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = raw.get(name + SCALE_SUFFIX)
        if scale is not None:
            s = float(scale)
            if not (s >= 0.0 and s < float("inf")):
                raise CodecError(f"{name}: invalid int8 scale {s}")
            out[name] = t.to(torch.float32) * scale
        elif t.is_floating_point():
            out[name] = t.to(torch.float32)
        else:
            out[name] = t
    return out


def _check_same_keys(a: StateView, b: StateView, what: str) -> None:
    if set(a) != set(b):
        missing, extra = sorted(set(b) - set(a)), sorted(set(a) - set(b))
        raise CodecError(f"{what}: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in a.items():
        if v.shape != b[k].shape:
            raise CodecError(
                f"{what}: {k} has shape {tuple(v.shape)}, expected {tuple(b[k].shape)}"
            )


def make_delta(trained: StateView, base: StateView) -> State:
    """``trained - base`` in float32 for floating tensors; trained values for the others.

    Both dicts must have the same names and shapes (else :class:`CodecError`).
    """
    _check_same_keys(trained, base, "make_delta")
    return {
        k: (t.detach().to(torch.float32) - base[k].detach().to(torch.float32))
        if _is_float(base[k])
        else t.detach().clone()
        for k, t in trained.items()
    }


def apply_delta(base: StateView, delta: StateView) -> State:
    """Full weights from a base state and a decoded delta, in the base's dtypes.

    Floating tensors: ``base + delta`` (computed in float32); others: the delta's value.
    """
    _check_same_keys(delta, base, "apply_delta")
    out: State = {}
    for k, b in base.items():
        d = delta[k]
        if _is_float(b):
            out[k] = (b.detach().to(torch.float32) + d.to(torch.float32)).to(b.dtype)
        else:
            out[k] = d.detach().to(b.dtype).clone()
    return out


def max_encoded_bytes(reference: StateView) -> int:
    """An upper bound on ``len(encode_state(x, c))`` for any ``x`` shaped like ``reference``,
    any compression: float32 data (the widest mode) plus a generous header allowance."""
    data = sum(
        t.numel() * (4 if _is_float(t) else t.element_size()) + (4 if _is_float(t) else 0)
        for t in reference.values()
    )
    header = 256 + sum(2 * len(k) + 160 for k in reference)
    return data + header
