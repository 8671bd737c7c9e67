"""Every reason a message may give: one enumerated wire type, and the verdicts that carry
a reason inside each party.

:class:`Refusal` names why a party refuses a message it received (the coordinator an
update or a registration, an agent a task, any receiver a message that is stale,
replayed, of another run or of an unsupported version); :class:`ReleaseRefusal` why a
device refuses or fails a release. :data:`REASONS` is ``"ok"`` followed by both, in this
order, without repeats: the values ``ack.reason`` and ``release_report.reason`` may take
(:data:`ReasonCode`). A message of a higher minor version may carry a reason this code
does not know; it is then accepted as given (a minor version may add reasons).

Pure and light: no torch, so a process that only reads messages can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any

from pydantic import AfterValidator, ValidationInfo, WithJsonSchema

OK = "ok"
MAX_REASON_CHARS = 64
NEWER_MINOR = "newer_minor"  # validation context key: the message is of a higher minor


class Refusal(str, Enum):
    """Why a received message (an update, a registration, a task, any control message)
    was refused."""

    UNKNOWN_AGENT = "unknown_agent"  # not in the registry
    WRONG_PROTOTYPE = "wrong_prototype"  # agent is bound to another prototype
    STALE_ROUND = "stale_round"  # for an earlier round (replay or late)
    FUTURE_ROUND = "future_round"  # for a round not started
    NOT_ASSIGNED = "not_assigned"  # the agent has no task this round
    DUPLICATE = "duplicate"  # the agent already delivered another update this round
    WRONG_BASE = "wrong_base"  # delta not relative to this round's global model
    BAD_SIGNATURE = "bad_signature"  # HMAC does not verify
    DIGEST_MISMATCH = "digest_mismatch"  # assembled blob does not hash to the declared digest
    TOO_LARGE = "too_large"  # declared size or chunk count over the cap
    SHAPE_MISMATCH = "shape_mismatch"  # tensor names/shapes/dtypes differ from the prototype's
    NON_FINITE = "non_finite"  # NaN or inf
    NORM_BOUND = "norm_bound"  # L2 norm of the delta over the bound relative to the global model
    NO_SAMPLES = "no_samples"  # claims fewer than one training sample
    SAMPLE_CAP = "sample_cap"  # claims more samples than its registry entry allows
    MALFORMED = "malformed"  # undecodable header, chunk or blob
    EXPIRED = "expired"  # incomplete when its time ran out
    # inside the norm bound (takfl.wire.bounds, coordinator.influence)
    TENSOR_BOUND = "tensor_bound"  # one tensor's delta over its bound from the run's start
    BAD_VARIANCE = "bad_variance"  # a BatchNorm running variance not > 0 or over its bound
    BAD_COUNTER = "bad_counter"  # a batch counter went back or jumped past its bound
    BUFFER_BOUND = "buffer_bound"  # another buffer outside the bounds derived from the global
    VALIDATION_COST = "validation_cost"  # alone, costs its tier more than the margin
    # protocol 1.0: versions, runs, freshness, codecs
    UNSUPPORTED_VERSION = "unsupported_version"  # another major protocol version
    OTHER_RUN = "other_run"  # of another run of the coordinator
    RUN_FINISHED = "run_finished"  # the run ended before this update could be used
    STALE_MESSAGE = "stale_message"  # sent_at outside the receiver's replay window
    REPLAYED = "replayed"  # a nonce the receiver has already seen within the window
    CODEC_MISMATCH = "codec_mismatch"  # an update not encoded as its task's compression


class ReleaseRefusal(str, Enum):
    """Why a device refused or failed a release (what it reports, by name)."""

    MALFORMED = "malformed"  # not parseable as release metadata, or over the size cap
    BAD_SIGNATURE = "bad_signature"  # not signed by the fleet's release key (or tampered)
    EXPIRED = "expired"  # past its expiry (freeze attack, or simply too old)
    OLD_VERSION = "old_version"  # not newer than the release the device already trusts
    WRONG_TARGET = "wrong_target"  # for another fleet or prototype, or the wrong targets
    BAD_ARTIFACT = "bad_artifact"  # an artifact's length or SHA-256 is not the signed one
    INCOMPATIBLE = "incompatible"  # runtime, format or memory this device cannot meet
    NO_SPACE = "no_space"  # not enough free disk for the new slot
    DOWNLOAD_FAILED = "download_failed"  # the artifacts did not arrive in time
    LOAD_FAILED = "load_failed"  # the runtime cannot load the artifact
    PARITY = "parity"  # outputs differ from the signed reference outputs
    TOO_SLOW = "too_slow"  # batch-1 latency over the profile's budget
    TIMED_OUT = "timed_out"  # (coordinator side) no report within the per-device timeout


REASONS: tuple[str, ...] = tuple(
    dict.fromkeys([OK, *(r.value for r in Refusal), *(r.value for r in ReleaseRefusal)])
)


def _known_reason(value: str, info: ValidationInfo) -> str:
    if value in REASONS:
        return value
    context: Any = info.context
    if isinstance(context, dict) and context.get(NEWER_MINOR) and len(value) <= MAX_REASON_CHARS:
        return value  # a reason added by a later minor version
    raise ValueError(f"unknown reason {value[:MAX_REASON_CHARS]!r}; known: {', '.join(REASONS)}")


ReasonCode = Annotated[
    str,
    AfterValidator(_known_reason),
    WithJsonSchema({"type": "string", "enum": list(REASONS), "maxLength": MAX_REASON_CHARS}),
]


@dataclass(frozen=True)
class Verdict:
    """Accepted (``reason`` None) or refused with a named reason and a detail."""

    reason: Refusal | None = None
    detail: str = ""

    @property
    def accepted(self) -> bool:
        return self.reason is None

    def __str__(self) -> str:
        return "accepted" if self.reason is None else f"{self.reason.value}: {self.detail}"


ACCEPTED = Verdict()


def refuse(reason: Refusal, detail: str) -> Verdict:
    return Verdict(reason, detail)
