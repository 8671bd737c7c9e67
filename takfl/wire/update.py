"""Building signed tasks and updates (pure: tensors and messages in, messages and bytes out)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from takfl.state import State, StateView
from takfl.wire.chunking import blob_ref
from takfl.wire.codec import make_delta
from takfl.wire.codecs import resolve_codec, send_delta
from takfl.wire.freshness import new_nonce
from takfl.wire.messages import TaskMessage, UpdateHeader
from takfl.wire.signing import sign
from takfl.wire.telemetry import Telemetry


@dataclass(frozen=True)
class PreparedUpdate:
    """A signed update header, the delta blob it announces and, for a codec with error
    feedback, the residual the sender keeps for its next update."""

    header: UpdateHeader
    blob: bytes
    residual: State | None = None


def prepare_update(
    task: TaskMessage,
    trained: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    *,
    secret: bytes,
    num_samples: int,
    metrics: Mapping[str, float] | None = None,
    compression: str | None = None,
    chunk_size: int | None = None,
    telemetry: Telemetry | None = None,
    residual: StateView | None = None,
) -> PreparedUpdate:
    """Encode ``trained - base`` through the task's codec and sign the header announcing it.

    Args:
        task: the task being answered (run, round, agent, prototype, base digest, defaults).
        trained: the locally trained state dict; base: the task's global state.
        compression, chunk_size: override the task's choices (a coordinator refuses an
            update in another compression than its task's: ``codec_mismatch``).
        telemetry: the agent's report, signed with the header.
        residual: the error-feedback residual kept from the last update (a codec with
            error feedback adds it; one that no longer fits is dropped with a log line).
    """
    codec = resolve_codec(compression or task.compression)
    blob, _, kept = send_delta(codec, make_delta(trained, base), base, residual, seed=task.seed)
    return replace(
        prepare_blob(
            task,
            blob,
            secret=secret,
            num_samples=num_samples,
            metrics=metrics,
            compression=str(codec),
            chunk_size=chunk_size,
            telemetry=telemetry,
        ),
        residual=kept,
    )


def prepare_blob(
    task: TaskMessage,
    blob: bytes,
    *,
    secret: bytes,
    num_samples: int,
    metrics: Mapping[str, float] | None = None,
    compression: str | None = None,
    chunk_size: int | None = None,
    telemetry: Telemetry | None = None,
) -> PreparedUpdate:
    """The signed header announcing ``blob`` as the answer to ``task`` (in the task's
    compression and chunk size unless told otherwise): an encoded delta, or a secure
    round's masked input."""
    header = UpdateHeader(
        run=task.run,
        round_id=task.round_id,
        agent_id=task.agent_id,
        prototype=task.prototype,
        base_digest=task.global_digest,
        blob=blob_ref(blob, chunk_size or task.chunk_size),
        compression=compression or task.compression,
        num_samples=num_samples,
        metrics=dict(metrics or {}),
        telemetry=telemetry,
    )
    return PreparedUpdate(sign(header, secret), blob)


def signed_update_header(header: UpdateHeader, secret: bytes, **changes: object) -> UpdateHeader:
    """A copy of ``header`` with ``changes`` applied (validated) and signed again (a fresh
    nonce unless ``changes`` gives one)."""
    fields = header.model_dump(by_alias=True) | {"nonce": new_nonce()} | changes
    fields["signature"] = ""
    return sign(UpdateHeader.model_validate(fields, strict=False), secret)
