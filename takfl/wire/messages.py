"""Typed wire messages: the JSON messages of a round and the compact binary chunk.

Every JSON message has the envelope of :mod:`takfl.wire.envelope` (protocol version,
kind, run, ``sent_at``, nonce, signature), is canonical JSON on the wire and is decoded
strictly (:func:`decode_message`).

A chunk is ``CHUNK_HEADER`` (44 bytes, big-endian) followed by the payload::

    magic b"TKC" | version u8 | sha256 digest of the whole blob (32 bytes) | index u32 | count u32
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    Field,
    StringConstraints,
    model_validator,
)

from takfl.config.profile import HardwareClass
from takfl.config.training import LocalTraining, Optimizer
from takfl.wire.codec_names import CodecNameError, parse_codec
from takfl.wire.envelope import MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES
from takfl.wire.envelope import WIRE_MODEL, Strict, validate_object
from takfl.wire.envelope import SignedMessage as SignedMessage
from takfl.wire.envelope import WireMessage as WireMessage
from takfl.wire.envelope import decode_message as decode_message
from takfl.wire.envelope import encode_message as encode_message
from takfl.wire.errors import MalformedChunk, MalformedMessage
from takfl.wire.reasons import OK, ReasonCode, Refusal
from takfl.wire.telemetry import Telemetry
from takfl.wire.topics import IDENT_RE

MAX_CHUNK_BYTES = 16 * 1024 * 1024  # payload of one chunk (profiles allow up to 16 MiB)
# Largest MQTT packet any party needs: a full chunk, its header, topic and framing.
# Brokers (Mosquitto's max_packet_size, the embedded one) and clients refuse larger ones.
MAX_PACKET_BYTES = MAX_CHUNK_BYTES + 64 * 1024
MAX_METRICS = 32  # metric entries in an update header
MAX_MISSING = 4096  # chunk indices a receiver accepts in one ChunkRequest (senders: 1024)
MAX_CHANNELS = 1024  # entries of a task's input normalisation
MAX_NEIGHBOURS = 256  # a client's neighbours in a secure round (a full graph: 257 clients)
DIGEST_BYTES = 32  # SHA-256

COMPRESSIONS: tuple[str, ...] = ("fp32", "fp16", "int8")  # the per-tensor codecs
MAX_CODEC_CHARS = 64


def _codec_choice(text: str) -> str:
    try:
        return str(parse_codec(text))
    except CodecNameError as e:
        raise ValueError(str(e)) from None


# a codec choice (takfl.wire.codec_names) in its canonical text: a name, then the
# settings it takes ("fp16", "sign1:block=256,density=0.6")
Compression = Annotated[
    str, StringConstraints(max_length=MAX_CODEC_CHARS), AfterValidator(_codec_choice)
]

Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Ident = Annotated[str, StringConstraints(pattern=f"^{IDENT_RE}$")]
Label = Annotated[str, StringConstraints(min_length=1, max_length=128)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
NonNegInt = Annotated[int, Field(ge=0, le=2**53)]


def chunk_count(size: int, chunk_size: int) -> int:
    """Chunks a blob of ``size`` bytes splits into (an empty blob is one empty chunk)."""
    if size < 0 or chunk_size <= 0:
        raise ValueError(f"bad blob size {size} or chunk size {chunk_size}")
    return max(1, math.ceil(size / chunk_size))


class BlobRef(Strict):
    """A content-addressed blob as announced before its chunks."""

    digest: Digest  # SHA-256 of the whole blob, hex
    size: Annotated[int, Field(ge=0, le=2**40)]  # bytes
    chunk_size: Annotated[int, Field(gt=0, le=MAX_CHUNK_BYTES)]  # every chunk but the last
    count: Annotated[int, Field(ge=1, le=2**32 - 1)]  # number of chunks

    @model_validator(mode="after")
    def _count_matches(self) -> BlobRef:
        if self.count != chunk_count(self.size, self.chunk_size):
            raise ValueError(
                f"count {self.count} does not match size {self.size} / chunk_size {self.chunk_size}"
            )
        return self


class ModelRef(Strict):
    """Which zoo builder an agent builds (see ``takfl.models``)."""

    builder: Ident
    args: dict[str, Any] = Field(default_factory=dict)


class TrainingRef(LocalTraining):
    """Local-training settings the coordinator dictates for a task (the device keeps
    its own threads, memory cap and time budget)."""

    # The config's LocalTraining as a task carries it: every setting stated (no
    # defaults but weight_decay's), checked strictly and within the protocol's caps.
    model_config = WIRE_MODEL

    epochs: Annotated[int, Field(ge=1, le=10_000)]
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)]
    optimizer: Optimizer
    learning_rate: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0


class Registration(SignedMessage):
    kind: Literal["register"] = "register"
    agent_id: Ident
    prototype: Ident
    profile: Label  # device profile name
    hardware_class: HardwareClass
    num_samples: NonNegInt  # private training samples on the device
    telemetry: Telemetry | None = None  # platform and resources (takfl.wire.telemetry)


class InputNorm(Strict):
    """How the model's inputs are standardised: per channel ``c``,
    ``x = (x01 - mean[c]) / std[c]``, where ``x01`` are the raw values scaled to [0, 1]
    (8-bit images: / 255; the bundled 8x8 digits: / 16). One entry per input channel."""

    mean: Annotated[list[FiniteFloat], Field(min_length=1, max_length=MAX_CHANNELS)]
    std: Annotated[
        list[Annotated[float, Field(gt=0, allow_inf_nan=False)]],
        Field(min_length=1, max_length=MAX_CHANNELS),
    ]

    @model_validator(mode="after")
    def _one_per_channel(self) -> InputNorm:
        if len(self.mean) != len(self.std):
            raise ValueError(f"{len(self.mean)} means for {len(self.std)} standard deviations")
        return self


class SecAggTask(Strict):
    """``task.secagg``: this agent's part in its prototype's secure round."""

    neighbours: Annotated[
        list[Ident], Field(min_length=1, max_length=MAX_NEIGHBOURS)
    ]  # the clients it masks with and shares its secrets to, sorted
    threshold: Annotated[int, Field(ge=1, le=MAX_NEIGHBOURS + 1)]  # t shares recover a secret
    clients: Annotated[int, Field(ge=2, le=1_000_000)]  # n, sampled in the prototype's round
    bits: Literal[32, 64]  # the group Z_(2^bits) of the masked input
    clip_norm: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]  # C
    length: Annotated[int, Field(ge=1, le=2**32)]  # coordinates of the input vector
    # distributed DP: the Gaussian noise the agent adds per coordinate after clipping (0:
    # none); its coordinates are then clamped to clip_norm + 10 noise_std, the encoding's range
    noise_std: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)] = 0.0

    @model_validator(mode="after")
    def _consistent(self) -> SecAggTask:
        if sorted(set(self.neighbours)) != self.neighbours:
            raise ValueError("neighbours must be distinct and sorted")
        if self.threshold > len(self.neighbours) + 1:
            raise ValueError(
                f"threshold {self.threshold} exceeds the {len(self.neighbours) + 1} share holders"
            )
        return self


class TaskMessage(SignedMessage):
    """One agent's work for one round; the global model follows as chunks of ``blob``."""

    kind: Literal["task"] = "task"
    OMITTED_WHEN_ABSENT: ClassVar[frozenset[str]] = frozenset({"base", "model_digest", "secagg"})
    round_id: NonNegInt
    agent_id: Ident
    prototype: Ident
    model: ModelRef
    num_classes: Annotated[int, Field(ge=2, le=1_000_000)]
    input_shape: tuple[
        Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]
    ]
    seed: NonNegInt
    deadline: FiniteFloat  # unix time after which the update is no longer wanted
    compression: Compression  # how the agent encodes its update delta
    chunk_size: Annotated[int, Field(gt=0, le=MAX_CHUNK_BYTES)]  # chunk size of the update
    # the global model: the full model, encode_state(..., "fp32") (base None), or a
    # codec's delta against the model the agent holds under ``base`` (takfl.wire.downlink)
    blob: BlobRef
    base: Digest | None = None  # model digest the blob is a delta against
    model_digest: Digest | None = None  # the model's digest after the delta (with base)
    training: TrainingRef | None = None  # None: the agent's profile decides
    # ExecuTorch training program (.pte) for agents that train through ExecuTorch; the
    # same for every round of a prototype, so an agent caches it by digest and asks for
    # its chunks (ChunkRequest) only when it does not hold it. None: no program offered.
    program: BlobRef | None = None
    # the standardisation the coordinator's data has (a native agent applies the same to
    # its raw inputs); None: not known to the coordinator
    input_norm: InputNorm | None = None
    # a secure round (privacy mode secagg): the update is a masked input (takfl.wire.secure)
    secagg: SecAggTask | None = None

    @property
    def global_digest(self) -> str:
        """The model digest of the global this task trains from (what an update's
        ``base_digest`` names): the full blob's digest, or ``model_digest``."""
        return self.blob.digest if self.base is None else str(self.model_digest)

    @model_validator(mode="after")
    def _delta_names_its_model(self) -> TaskMessage:
        if (self.base is None) != (self.model_digest is None):
            raise ValueError("base and model_digest come together (a delta) or not at all")
        return self

    @model_validator(mode="after")
    def _norm_per_channel(self) -> TaskMessage:
        if self.input_norm is not None and len(self.input_norm.mean) != self.input_shape[0]:
            raise ValueError(
                f"input_norm has {len(self.input_norm.mean)} channels, input_shape "
                f"{self.input_shape[0]}"
            )
        return self


class UpdateHeader(SignedMessage):
    """An agent's answer to a task; the delta blob follows as chunks of ``blob``."""

    kind: Literal["update"] = "update"
    round_id: NonNegInt
    agent_id: Ident
    prototype: Ident
    base_digest: Digest  # model digest of the global the delta is relative to
    blob: BlobRef  # trained - global through the task's compression codec
    compression: Compression
    num_samples: NonNegInt
    metrics: Annotated[
        dict[Annotated[str, StringConstraints(max_length=64)], FiniteFloat],
        Field(max_length=MAX_METRICS),
    ] = Field(default_factory=dict)
    telemetry: Telemetry | None = None  # platform and resources (takfl.wire.telemetry)

    @property
    def key(self) -> tuple[int, str, str]:
        """Idempotency key: (round id, agent id, blob digest)."""
        return (self.round_id, self.agent_id, self.blob.digest)


class ChunkRequest(SignedMessage):
    """Ask the sender of ``digest`` to publish these chunk indices again.

    ``agent_id`` is the agent whose transfer it is: the requester on its ``up/request``
    topic, the addressee on its ``down/request`` topic; signed with that agent's secret.
    """

    kind: Literal["chunk_request"] = "chunk_request"
    agent_id: Ident
    digest: Digest
    missing: Annotated[
        list[Annotated[int, Field(ge=0, le=2**32 - 2)]], Field(min_length=1, max_length=MAX_MISSING)
    ]


AckSubject = Literal["register", "task", "update"]


class Ack(SignedMessage):
    """What was accepted or refused, and why (``reason``: ``"ok"`` or a refusal,
    :data:`takfl.wire.reasons.REASONS`).

    Signed with the agent's secret (by the coordinator for registrations and updates, by
    the agent for tasks). ``digest`` names what is answered: the blob of an update or of a
    task, or, for a registration, the ``message_ref`` of that very registration, so an
    old answer cannot be replayed against a new registration.
    """

    kind: Literal["ack"] = "ack"
    subject: AckSubject
    agent_id: Ident
    round_id: NonNegInt | None = None
    digest: Digest | None = None
    accepted: bool
    reason: ReasonCode = OK
    detail: Annotated[str, StringConstraints(max_length=512)] = ""


Milliseconds = Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)]


class InferenceStatus(Strict):
    """An agent's local inference service since it started: prediction requests, those
    refused or failed, the latency of the recent ones (milliseconds, request received to
    answer ready) and the release it serves (None: none)."""

    requests: NonNegInt
    errors: NonNegInt
    latency_p50_ms: Milliseconds | None = None  # None until a prediction was served
    latency_p99_ms: Milliseconds | None = None
    active_version: Annotated[int, Field(ge=1)] | None = None


class Status(SignedMessage):
    """Presence of an agent or of the coordinator (retained; ``offline`` is the last will).

    An agent signs its status and names its prototype. ``time`` is the start of the
    connection it describes (the will armed for a connection carries the same time, and
    the same ``sent_at``, as the ``online`` sent on it), so a receiver orders statuses by
    (time, online before offline) and ignores older ones; a status is the one signed
    message exempt from the replay window (the broker publishes a will long after it was
    made). An agent that serves inference adds ``inference`` and publishes its ``online``
    status again (same ``time``) when that changed.
    """

    kind: Literal["status"] = "status"
    agent_id: Ident  # "coordinator" for the coordinator
    state: Literal["online", "offline"]
    time: FiniteFloat
    prototype: Ident | None = None  # the agent's; None for the coordinator
    inference: InferenceStatus | None = None


class GlobalAnnouncement(SignedMessage):
    """A prototype's new global model exists: retained and unsigned on the fleet's
    broadcast topic (for monitors), and signed for each agent (``agent_id``) on its own
    ``down/global`` topic (what agents act on)."""

    kind: Literal["global"] = "global"
    round_id: NonNegInt
    prototype: Ident
    digest: Digest
    size: NonNegInt
    agent_id: Ident | None = None


def decode_version_refusal(received: dict[str, Any]) -> Ack:
    """The one message read across major versions: an ``ack`` refusing a registration
    with ``unsupported_version`` (its fields are those of protocol 1.0's ``ack`` in every
    major version). ``received``: the object of an :class:`UnsupportedVersion`.

    Raises MalformedMessage when it is anything else."""
    ack = validate_object(Ack, received, None)
    if ack.subject != "register" or ack.reason != Refusal.UNSUPPORTED_VERSION.value:
        raise MalformedMessage(f"an ack of protocol {ack.protocol} that is not a version refusal")
    return ack


# -- binary chunks ------------------------------------------------------------------
CHUNK_MAGIC = b"TKC"
CHUNK_VERSION = 1
_CHUNK_HEADER = struct.Struct(">3sB32sII")
CHUNK_HEADER_BYTES = _CHUNK_HEADER.size


@dataclass(frozen=True, kw_only=True)
class Chunk:
    """Piece ``index`` of ``count`` of the blob whose SHA-256 is ``digest``."""

    digest: bytes
    index: int
    count: int
    payload: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != DIGEST_BYTES:
            raise MalformedChunk(f"digest must be {DIGEST_BYTES} bytes, got {len(self.digest)}")
        if not 1 <= self.count <= 2**32 - 1:
            raise MalformedChunk(f"chunk count {self.count} out of range")
        if not 0 <= self.index < self.count:
            raise MalformedChunk(f"chunk index {self.index} not in [0, {self.count})")

    @property
    def hex_digest(self) -> str:
        return self.digest.hex()


def encode_chunk(chunk: Chunk) -> bytes:
    """Binary form of ``chunk``: fixed header, then the payload."""
    header = _CHUNK_HEADER.pack(CHUNK_MAGIC, CHUNK_VERSION, chunk.digest, chunk.index, chunk.count)
    return header + chunk.payload


def decode_chunk(data: bytes, *, max_payload: int | None = None) -> Chunk:
    """Parse a binary chunk; :class:`MalformedChunk` on a bad header or an oversized payload."""
    if not isinstance(data, bytes | bytearray):
        raise MalformedChunk(f"expected bytes, got {type(data).__name__}")
    if len(data) < CHUNK_HEADER_BYTES:
        raise MalformedChunk(
            f"{len(data)} bytes is shorter than the {CHUNK_HEADER_BYTES}-byte header"
        )
    magic, version, digest, index, count = _CHUNK_HEADER.unpack_from(data)
    if magic != CHUNK_MAGIC:
        raise MalformedChunk(f"bad magic {magic!r}")
    if version != CHUNK_VERSION:
        raise MalformedChunk(f"unsupported chunk version {version}")
    payload = bytes(data[CHUNK_HEADER_BYTES:])
    if max_payload is not None and len(payload) > max_payload:
        raise MalformedChunk(f"payload of {len(payload)} bytes exceeds the {max_payload} cap")
    return Chunk(digest=digest, index=index, count=count, payload=payload)
