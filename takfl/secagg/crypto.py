"""The primitives SecAgg+ needs, from well-kept libraries: X25519 key agreement, HKDF,
AES-GCM (``cryptography``), AES-CTR as the mask generator, and Shamir sharing over
GF(2^128) (pycryptodome, 16-byte secrets: longer ones are split into 16-byte pieces)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32  # X25519 keys, HKDF outputs, mask seeds
SHAMIR_PIECE = 16  # pycryptodome's Shamir shares 16-byte secrets
MASK_INFO = b"takfl-secagg/v1 pairwise mask"
CHANNEL_INFO = b"takfl-secagg/v1 share channel"


class SecAggCryptoError(ValueError):
    """A share did not decrypt (wrong key, forged or altered), or too few to recombine."""


@dataclass(frozen=True)
class KeyPair:
    private: bytes  # 32 raw bytes
    public: bytes  # 32 raw bytes


def new_key_pair() -> KeyPair:
    """A fresh X25519 key pair (raw bytes)."""
    key = X25519PrivateKey.generate()
    return KeyPair(key.private_bytes_raw(), key.public_key().public_bytes_raw())


def public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def agree(private: bytes, peer_public: bytes, info: bytes, context: bytes) -> bytes:
    """HKDF-SHA256 of the X25519 shared secret, salted with ``context`` (run, round and
    prototype), ``info`` telling masks from share channels: 32 bytes, the same on both sides."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(peer_public)
    )
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=context, info=info).derive(shared)


def expand_mask(seed: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """``length`` pseudo-random words of ``dtype`` (uint32 or uint64, little-endian) from
    AES-256-CTR keyed by ``seed`` (a fresh key per round and pair, so a zero nonce)."""
    if len(seed) != KEY_BYTES:
        raise ValueError(f"a mask seed is {KEY_BYTES} bytes, got {len(seed)}")
    size = np.dtype(dtype).itemsize * length
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    stream = enc.update(b"\0" * size) + enc.finalize()
    return np.frombuffer(stream, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM: a random 12-byte nonce followed by the ciphertext and tag."""
    import os

    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """The plaintext of :func:`seal`'s output; :class:`SecAggCryptoError` if it was altered,
    sealed under another key or for other associated data."""
    try:
        return AESGCM(key).decrypt(sealed[:12], sealed[12:], associated)
    except (InvalidTag, ValueError) as e:
        raise SecAggCryptoError("a share did not decrypt: altered, or not meant for us") from e


def split_secret(secret: bytes, threshold: int, holders: int) -> list[tuple[int, bytes]]:
    """Shamir shares of ``secret`` (a multiple of 16 bytes) for holders 1..``holders``:
    any ``threshold`` of them recover it, fewer reveal nothing. Each share is
    (index, the 16-byte shares of every 16-byte piece, concatenated)."""
    from Crypto.Protocol.SecretSharing import Shamir

    if len(secret) % SHAMIR_PIECE or not secret:
        raise ValueError(f"secret length must be a positive multiple of {SHAMIR_PIECE}")
    if not 1 <= threshold <= holders:
        raise ValueError(f"need 1 <= threshold <= holders, got {threshold} of {holders}")
    pieces = [secret[i : i + SHAMIR_PIECE] for i in range(0, len(secret), SHAMIR_PIECE)]
    per_piece = [Shamir.split(threshold, holders, piece) for piece in pieces]
    return [
        (index, b"".join(shares[h][1] for shares in per_piece))
        for h, (index, _) in enumerate(per_piece[0])
    ]


def combine_secret(shares: list[tuple[int, bytes]], threshold: int) -> bytes:
    """The secret behind ``threshold`` or more distinct shares of :func:`split_secret`.

    Raises:
        SecAggCryptoError: fewer than ``threshold`` distinct shares.
    """
    from Crypto.Protocol.SecretSharing import Shamir

    distinct = dict(shares)
    if len(distinct) < threshold:
        raise SecAggCryptoError(f"{len(distinct)} share(s), {threshold} needed")
    chosen = sorted(distinct.items())[:threshold]
    width = len(chosen[0][1])
    pieces = [
        Shamir.combine([(i, s[p : p + SHAMIR_PIECE]) for i, s in chosen])
        for p in range(0, width, SHAMIR_PIECE)
    ]
    return b"".join(pieces)
