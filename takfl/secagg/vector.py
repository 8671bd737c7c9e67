"""A model delta as the vector secure aggregation sums, and the sum back as a model.

Both ends flatten the same way, so a native agent can too: the floating entries of the
state (weights and BatchNorm running statistics; integer entries such as
``num_batches_tracked`` never enter a secure sum), in the byte order of their names,
each in row-major order, as float64. The agent clips the whole vector to L2 norm C
(:func:`takfl.secagg.client.clip_vector`) before encoding it.

Also here: the round's context (what binds keys, masks and shares to one run, round and
prototype).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch

from takfl.state import State, StateView

CONTEXT_LABEL = b"takfl-secagg-1"


def floating_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The floating entries of ``state``, in the byte order of their names."""
    return sorted((k for k, v in state.items() if v.is_floating_point()), key=str.encode)


def vector_length(state: Mapping[str, torch.Tensor]) -> int:
    """Coordinates of ``state``'s secure-sum vector."""
    return sum(state[k].numel() for k in floating_names(state))


def delta_vector(trained: StateView, base: StateView) -> np.ndarray:
    """``trained - base`` over ``base``'s floating entries, flattened (float64).

    Raises:
        ValueError: ``trained`` lacks an entry of ``base`` or differs in shape.
    """
    parts = []
    for key in floating_names(base):
        ref = base[key]
        if key not in trained or trained[key].shape != ref.shape:
            raise ValueError(f"the trained model's {key} does not match the global's")
        diff = trained[key].detach().to("cpu", torch.float64) - ref.detach().to(
            "cpu", torch.float64
        )
        parts.append(diff.reshape(-1).numpy())
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)


def add_vector(reference: StateView, vector: np.ndarray, scale: float = 1.0) -> State:
    """``reference + scale * vector`` on the floating entries (in their dtype; the
    vector laid out as :func:`delta_vector` lays it), ``reference``'s own values on the
    others.

    Raises:
        ValueError: the vector's length is not the reference's.
    """
    names = floating_names(reference)
    want = sum(reference[k].numel() for k in names)
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    if v.size != want:
        raise ValueError(f"a vector of {v.size} values for a model of {want}")
    out: State = {k: t.detach().clone() for k, t in reference.items()}
    at = 0
    for key in names:
        ref = reference[key]
        n = ref.numel()
        step = torch.from_numpy(v[at : at + n].copy()).reshape(ref.shape) * scale
        out[key] = (ref.detach().to("cpu", torch.float64) + step).to(ref.dtype)
        at += n
    return out


def round_context(run: str, round_id: int, prototype: str) -> bytes:
    """SHA-256 of ``takfl-secagg-1|<run>|<round>|<prototype>``: keys, masks and shares of
    one prototype's round are bound to it (a share of one round opens nothing in
    another)."""
    text = b"|".join([CONTEXT_LABEL, run.encode(), str(round_id).encode(), prototype.encode()])
    return hashlib.sha256(text).digest()
