"""Per-agent secret files: one line, the secret in hex (at least 16 bytes), mode 0600.

Written by the coordinator's provisioning, read by agents (``--secret-file``). The
secrets themselves and what they sign are in the pure :mod:`takfl.wire.signing`.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

from takfl.files import atomic_write_text
from takfl.wire.errors import SecretError
from takfl.wire.signing import MIN_SECRET_BYTES, generate_secret

log = logging.getLogger(__name__)


def write_secret_file(
    path: str | Path, secret: bytes | None = None, *, overwrite: bool = False
) -> bytes:
    """Write ``secret`` (a new one when None) as hex to ``path`` with mode 0600; returns it."""
    p = Path(path)
    secret = secret if secret is not None else generate_secret()
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretError(f"secret of {len(secret)} bytes is too short (min {MIN_SECRET_BYTES})")
    if p.exists() and not overwrite:
        raise SecretError(f"{p} exists; pass overwrite=True to replace it")
    atomic_write_text(p, secret.hex() + "\n", mode=0o600)
    return secret


def load_secret_file(path: str | Path) -> bytes:
    """Read a secret written by :func:`write_secret_file` (``--secret-file``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="ascii").strip()
        mode = p.stat().st_mode
    except (OSError, UnicodeDecodeError) as e:
        raise SecretError(f"cannot read secret file {p} ({e})") from e
    try:
        secret = bytes.fromhex(text)
    except ValueError as e:
        raise SecretError(f"{p} does not hold a hex secret; regenerate it") from e
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretError(
            f"{p}: secret of {len(secret)} bytes is too short (min {MIN_SECRET_BYTES})"
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("secret file %s is readable by other users; chmod 600 it", p)
    return secret
