"""The masks of SecAgg+: pairwise masks that cancel in the sum, and the self mask."""

from __future__ import annotations

import numpy as np

from takfl.secagg.crypto import MASK_INFO, agree, expand_mask


def pair_sign(me: str, other: str) -> int:
    """+1 if ``me`` adds the pair's mask, -1 if it subtracts it (so the pair cancels)."""
    return 1 if me < other else -1


def pairwise_mask(
    my_private: bytes, peer_public: bytes, context: bytes, length: int, dtype: np.dtype
) -> np.ndarray:
    """PRG(HKDF(X25519(mine, theirs))): the same words on both sides of the pair."""
    return expand_mask(agree(my_private, peer_public, MASK_INFO, context), length, dtype)


def apply_mask(total: np.ndarray, mask: np.ndarray, sign: int) -> np.ndarray:
    """``total + sign * mask`` mod 2^bits (numpy's unsigned arithmetic wraps)."""
    return total + mask if sign > 0 else total - mask
