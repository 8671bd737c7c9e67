"""The wire format shared by the coordinator and the agents: topics, messages,
tensor codec, chunking, signing and update validation. Pure: no network.

``import takfl.wire`` is cheap: the names below are loaded on first use, so a process
that only reads messages (an inference service) never imports the tensor codec and torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Ack": "takfl.wire.messages",
    "AgentRecord": "takfl.wire.validation",
    "apply_delta": "takfl.wire.codec",
    "blob_ref": "takfl.wire.chunking",
    "BlobRef": "takfl.wire.messages",
    "BlobTooLarge": "takfl.wire.errors",
    "Chunk": "takfl.wire.messages",
    "ChunkMismatch": "takfl.wire.errors",
    "ChunkRequest": "takfl.wire.messages",
    "CodecError": "takfl.wire.errors",
    "decode_chunk": "takfl.wire.messages",
    "decode_message": "takfl.wire.messages",
    "decode_state": "takfl.wire.codec",
    "DigestMismatch": "takfl.wire.errors",
    "Down": "takfl.wire.topics",
    "encode_chunk": "takfl.wire.messages",
    "encode_message": "takfl.wire.messages",
    "encode_state": "takfl.wire.codec",
    "generate_secret": "takfl.wire.signing",
    "GlobalAnnouncement": "takfl.wire.messages",
    "load_secret_file": "takfl.wire.signing",
    "make_delta": "takfl.wire.codec",
    "MalformedChunk": "takfl.wire.errors",
    "MalformedMessage": "takfl.wire.errors",
    "Reassembler": "takfl.wire.chunking",
    "ReassemblyLimits": "takfl.wire.chunking",
    "Refusal": "takfl.wire.validation",
    "Registration": "takfl.wire.messages",
    "SecretError": "takfl.wire.errors",
    "sha256": "takfl.wire.chunking",
    "sign": "takfl.wire.signing",
    "split": "takfl.wire.chunking",
    "Status": "takfl.wire.messages",
    "TaskMessage": "takfl.wire.messages",
    "TopicError": "takfl.wire.errors",
    "Topics": "takfl.wire.topics",
    "UnknownBlob": "takfl.wire.errors",
    "Up": "takfl.wire.topics",
    "UpdateBounds": "takfl.wire.validation",
    "UpdateHeader": "takfl.wire.messages",
    "Verdict": "takfl.wire.validation",
    "verify": "takfl.wire.signing",
    "WireError": "takfl.wire.errors",
    "write_secret_file": "takfl.wire.signing",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'takfl.wire' has no attribute {name!r}")
