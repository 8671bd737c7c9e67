"""Model checkpoints as safetensors with the metadata needed to rebuild and use them.

Metadata (all strings, as safetensors requires): prototype, round, builder,
builder_args (JSON), num_classes, input_shape (JSON), class_names (JSON),
mean/std (JSON, per-channel normalisation already applied to inputs).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from takfl.files import atomic_write_bytes
from takfl.models import build_model
from takfl.state import non_finite_entry


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model it claims."""


@dataclass(kw_only=True)
class CheckpointMeta:
    prototype: str
    round: int
    builder: str
    num_classes: int
    input_shape: tuple[int, int, int]
    builder_args: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    def to_strings(self) -> dict[str, str]:
        return {
            "prototype": self.prototype,
            "round": str(self.round),
            "builder": self.builder,
            "builder_args": json.dumps(self.builder_args, sort_keys=True),
            "num_classes": str(self.num_classes),
            "input_shape": json.dumps(list(self.input_shape)),
            "class_names": json.dumps(self.class_names),
            "mean": json.dumps(self.mean),
            "std": json.dumps(self.std),
        }

    @classmethod
    def from_strings(cls, meta: dict[str, str], source: str = "checkpoint") -> CheckpointMeta:
        try:
            shape = json.loads(meta["input_shape"])
            return cls(
                prototype=meta["prototype"],
                round=int(meta["round"]),
                builder=meta["builder"],
                num_classes=int(meta["num_classes"]),
                input_shape=(int(shape[0]), int(shape[1]), int(shape[2])),
                builder_args=json.loads(meta.get("builder_args", "{}")),
                class_names=json.loads(meta.get("class_names", "[]")),
                mean=json.loads(meta.get("mean", "[]")),
                std=json.loads(meta.get("std", "[]")),
            )
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise CheckpointError(f"{source}: metadata is incomplete or malformed ({e})") from e

    def build(self) -> nn.Module:
        """The model this metadata names (weights freshly initialised)."""
        try:
            return build_model(
                self.builder, self.num_classes, self.input_shape, **self.builder_args
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint names a model that cannot be built: {e}") from e


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], meta: CheckpointMeta) -> str:
    """Atomically save ``state`` (CPU tensors) with ``meta``; returns the file's SHA-256."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    data = save(tensors, metadata=meta.to_strings())
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """Read a checkpoint and check its tensors against the model its metadata names."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {p}")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            raw_meta = f.metadata() or {}
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p} is not a readable safetensors checkpoint ({e})") from e
    meta = CheckpointMeta.from_strings(raw_meta, str(p))
    check_state_matches(meta.build().state_dict(), state, str(p))
    if (name := non_finite_entry(state)) is not None:
        raise CheckpointError(f"{p}: tensor {name} holds NaN or inf values")
    return state, meta


def check_state_matches(
    expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str
) -> None:
    """Raise :class:`CheckpointError` naming every missing, extra or mis-shaped tensor."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:5]}")
        raise CheckpointError(f"{source} does not match its model: " + "; ".join(parts))


def load_model(path: str | Path) -> tuple[nn.Module, CheckpointMeta]:
    """Build the model a checkpoint names and load its weights; eval mode."""
    state, meta = load_checkpoint(path)
    model = meta.build()
    model.load_state_dict(state)
    model.eval()
    return model, meta
