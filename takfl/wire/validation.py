"""Checks a received update passes before it may touch any aggregate.

Every check returns a :class:`Verdict` (accepted, or refused with a named
:class:`Refusal` and a human-readable detail); nothing here raises on bad
input. The order is: who sent it (known agent, signature, prototype binding),
whether it is wanted (current round, assigned task, base model), what it claims
(sample count within the agent's allowance, declared size), then the content
(digest, decodable, names/shapes/dtypes, finite, norm bound relative to the
global model).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from takfl.state import State, non_finite_entry
from takfl.wire.chunking import sha256
from takfl.wire.codec_names import parse_codec
from takfl.wire.codecs import blob_codec, decode_blob
from takfl.wire.errors import CodecError
from takfl.wire.messages import Registration, UpdateHeader
from takfl.wire.reasons import ACCEPTED, Refusal, Verdict, refuse
from takfl.wire.signing import verify


@dataclass(frozen=True, kw_only=True)
class AgentRecord:
    """A provisioned agent: its secret, the prototype it trains and the most training
    samples it may claim (its FedAvg weight); None until provisioned or first registered,
    and then at most ``sample_ceiling`` (the fleet's; None: no ceiling)."""

    agent_id: str
    prototype: str
    secret: bytes = field(repr=False)
    max_samples: int | None = None
    sample_ceiling: int | None = None


DEFAULT_NORM_FACTOR = 5.0  # honest digits deltas measured at 0.1-0.5 x the global norm
DEFAULT_NORM_FLOOR = 1.0


@dataclass(frozen=True, kw_only=True)
class UpdateBounds:
    """What a decoded update may be. The delta's L2 norm (over every floating tensor)
    is bounded relative to a reference norm: ``||delta|| <= norm_factor * max(||ref||,
    norm_floor)``, where ``ref`` is the run's initial global model when the caller knows
    it (an accepted update cannot move that), else the global model the delta is of."""

    norm_factor: float = DEFAULT_NORM_FACTOR
    norm_floor: float = DEFAULT_NORM_FLOOR  # keeps the bound sane for near-zero globals
    max_blob_bytes: int = 256 * 1024 * 1024  # declared blob size cap (per-prototype caps lower)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.norm_factor) and self.norm_factor > 0):
            raise ValueError(f"norm_factor must be a positive number, got {self.norm_factor}")
        if not (math.isfinite(self.norm_floor) and self.norm_floor > 0):
            raise ValueError(f"norm_floor must be a positive number, got {self.norm_floor}")

    def max_norm(
        self, reference: Mapping[str, torch.Tensor], reference_norm: float | None = None
    ) -> float:
        """The largest delta norm allowed against the global state ``reference``, or
        against ``reference_norm`` (the run's initial global's norm) when given."""
        norm = delta_norm(reference) if reference_norm is None else reference_norm
        return self.norm_factor * max(norm, self.norm_floor)


def check_samples(num_samples: int, record: AgentRecord) -> Verdict:
    """At least one sample, at most what the agent's registry entry allows: its
    allowance, or while it has none the fleet's ceiling."""
    if num_samples < 1:
        return refuse(Refusal.NO_SAMPLES, f"{record.agent_id!r} claims {num_samples} samples")
    if record.max_samples is not None and num_samples > record.max_samples:
        return refuse(
            Refusal.SAMPLE_CAP,
            f"{record.agent_id!r} claims {num_samples} samples, allowed {record.max_samples}",
        )
    ceiling = record.sample_ceiling
    if record.max_samples is None and ceiling is not None and num_samples > ceiling:
        return refuse(
            Refusal.SAMPLE_CAP,
            f"{record.agent_id!r} claims {num_samples} samples, over the fleet's ceiling "
            f"{ceiling}; raise its allowance with takfl-coordinator provision --agent",
        )
    return ACCEPTED


def check_registration(msg: Registration, registry: Mapping[str, AgentRecord]) -> Verdict:
    """Known agent, valid signature, prototype it was provisioned for, sample count
    within its allowance."""
    record = registry.get(msg.agent_id)
    if record is None:
        return refuse(Refusal.UNKNOWN_AGENT, f"agent {msg.agent_id!r} is not provisioned")
    if not verify(msg, record.secret):
        return refuse(Refusal.BAD_SIGNATURE, f"registration of {msg.agent_id!r}")
    if msg.prototype != record.prototype:
        return refuse(
            Refusal.WRONG_PROTOTYPE,
            f"{msg.agent_id!r} is bound to {record.prototype!r}, not {msg.prototype!r}",
        )
    return check_samples(msg.num_samples, record)


def check_header(
    header: UpdateHeader,
    registry: Mapping[str, AgentRecord],
    *,
    current_round: int,
    base_digest: str | None,
    max_blob_bytes: int,
) -> Verdict:
    """Checks on an update header, before any chunk is stored.

    Args:
        current_round: the round now collecting updates.
        base_digest: model digest of the global in this agent's task of this round
            (:attr:`TaskMessage.global_digest`), None if the agent has no task.
        max_blob_bytes: cap on the declared blob size.
    """
    record = registry.get(header.agent_id)
    if record is None:
        return refuse(Refusal.UNKNOWN_AGENT, f"agent {header.agent_id!r} is not provisioned")
    if not verify(header, record.secret):
        return refuse(Refusal.BAD_SIGNATURE, f"update header of {header.agent_id!r}")
    if header.prototype != record.prototype:
        return refuse(
            Refusal.WRONG_PROTOTYPE,
            f"{header.agent_id!r} is bound to {record.prototype!r}, sent for {header.prototype!r}",
        )
    if header.round_id < current_round:
        return refuse(Refusal.STALE_ROUND, f"round {header.round_id}, current {current_round}")
    if header.round_id > current_round:
        return refuse(Refusal.FUTURE_ROUND, f"round {header.round_id}, current {current_round}")
    if base_digest is None:
        return refuse(
            Refusal.NOT_ASSIGNED, f"{header.agent_id!r} has no task in round {current_round}"
        )
    if header.base_digest != base_digest:
        return refuse(
            Refusal.WRONG_BASE,
            f"delta against {header.base_digest[:12]}, round's global is {base_digest[:12]}",
        )
    samples = check_samples(header.num_samples, record)
    if not samples.accepted:
        return samples
    if header.blob.size > max_blob_bytes:
        return refuse(Refusal.TOO_LARGE, f"declared {header.blob.size} bytes, cap {max_blob_bytes}")
    return ACCEPTED


def delta_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over all floating tensors of ``delta`` (non-floating ones are not deltas)."""
    total = 0.0
    for t in delta.values():
        if t.is_floating_point():
            total += float(torch.linalg.vector_norm(t.to(torch.float64)) ** 2)
    return math.sqrt(total)


def check_delta(
    delta: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    *,
    bounds: UpdateBounds,
    reference_norm: float | None = None,
) -> Verdict:
    """Names, shapes and dtypes equal to ``reference`` (the global state the delta is
    relative to; floating -> float32 after decoding), all values finite, L2 norm within
    ``bounds.max_norm(reference, reference_norm)``."""
    verdict = check_layout(delta, reference)
    if not verdict.accepted:
        return verdict
    norm, bound = delta_norm(delta), bounds.max_norm(reference, reference_norm)
    if norm > bound:
        what = "global" if reference_norm is None else "initial global"
        return refuse(
            Refusal.NORM_BOUND,
            f"delta norm {norm:.4g} > {bounds.norm_factor:g} x {what} norm (bound {bound:.4g})",
        )
    return ACCEPTED


def check_layout(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> Verdict:
    """Names, shapes and dtypes of ``state`` equal to ``reference`` (floating entries
    as float32), every floating value finite. Used for deltas and for whole models
    (an agent checks a received global model with it)."""
    delta = state
    missing, extra = sorted(set(reference) - set(delta)), sorted(set(delta) - set(reference))
    if missing or extra:
        return refuse(Refusal.SHAPE_MISMATCH, f"missing {missing[:3]}, unexpected {extra[:3]}")
    for name, ref in reference.items():
        t = delta[name]
        if t.shape != ref.shape:
            return refuse(
                Refusal.SHAPE_MISMATCH,
                f"{name}: shape {tuple(t.shape)}, expected {tuple(ref.shape)}",
            )
        want = torch.float32 if ref.is_floating_point() else ref.dtype
        if t.dtype != want:
            return refuse(Refusal.SHAPE_MISMATCH, f"{name}: dtype {t.dtype}, expected {want}")
    if (bad := non_finite_entry(delta)) is not None:
        return refuse(Refusal.NON_FINITE, f"{bad} has NaN or inf values")
    return ACCEPTED


def decode_update(
    header: UpdateHeader,
    blob: bytes,
    reference: Mapping[str, torch.Tensor],
    *,
    bounds: UpdateBounds,
    reference_norm: float | None = None,
) -> tuple[Verdict, State | None]:
    """Check a complete blob against its (already checked) header and decode the delta:
    the blob must be of the header's codec, and its decoder checks every count, index and
    scale against ``reference`` before it allocates (norm bound: :func:`check_delta`).

    Returns ``(ACCEPTED, delta)`` or ``(refusal, None)``.
    """
    if len(blob) != header.blob.size or sha256(blob).hex() != header.blob.digest:
        return refuse(Refusal.DIGEST_MISMATCH, "blob does not match its declared digest"), None
    try:
        name, declared = blob_codec(blob), parse_codec(header.compression).name
        if name != declared:
            detail = f"blob in {name}, header says {declared}"
            return refuse(Refusal.CODEC_MISMATCH, detail), None
        delta = decode_blob(blob, reference, max_bytes=bounds.max_blob_bytes)
    except CodecError as e:
        return refuse(Refusal.MALFORMED, str(e)), None
    verdict = check_delta(delta, reference, bounds=bounds, reference_norm=reference_norm)
    return (verdict, delta) if verdict.accepted else (verdict, None)


def check_stored_update(
    agent_id: str,
    prototype: str,
    num_samples: int,
    state: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    registry: Mapping[str, AgentRecord] | None,
    *,
    bounds: UpdateBounds,
) -> Verdict:
    """Check again an update accepted earlier and kept on disk (full weights ``state``
    against the round's global ``reference``) before it is folded in after a restart:
    the agent still provisioned for ``prototype`` (skipped when ``registry`` is None,
    e.g. virtual clients), its sample count, then layout, finiteness and norm bound."""
    if registry is not None:
        record = registry.get(agent_id)
        if record is None:
            return refuse(Refusal.UNKNOWN_AGENT, f"agent {agent_id!r} is no longer provisioned")
        if record.prototype != prototype:
            return refuse(
                Refusal.WRONG_PROTOTYPE,
                f"{agent_id!r} is bound to {record.prototype!r}, stored for {prototype!r}",
            )
        samples = check_samples(num_samples, record)
    else:
        samples = check_samples(
            num_samples, AgentRecord(agent_id=agent_id, prototype=prototype, secret=b"")
        )
    if not samples.accepted:
        return samples
    layout = check_layout(state, reference)
    if not layout.accepted:
        return layout
    delta = {
        k: t.to(torch.float32) - reference[k].to(torch.float32)
        for k, t in state.items()
        if t.is_floating_point()
    }
    norm, bound = delta_norm(delta), bounds.max_norm(reference)
    if norm > bound:
        return refuse(Refusal.NORM_BOUND, f"delta norm {norm:.4g} > bound {bound:.4g}")
    return ACCEPTED
