"""The fleet's release key and the TUF root metadata that devices trust it through.

``provision`` makes both once per fleet::

    <dir>/release-key.pem   Ed25519 private key (PKCS#8 PEM, mode 600): stays with the
                            coordinator; signs every release
    <dir>/root.json         TUF root metadata naming the key's public half for every
                            role, signed by it: copied to every device (not secret)

A device verifies a release against ``root.json`` only (see
:func:`takfl.release.metadata.verify_release`); nothing else about the coordinator
needs to be trusted, so releases can pass through site brokers and be retained.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import CanonicalJSONSerializer, JSONSerializer

from takfl.files import atomic_write_bytes

KEY_FILE = "release-key.pem"
ROOT_FILE = "root.json"
ROLES = ("root", "targets", "snapshot", "timestamp")
ROOT_LIFETIME = timedelta(days=365)
MAX_ROOT_BYTES = 64 * 1024


class ReleaseKeyError(ValueError):
    """A release key or root file is missing, unreadable or does not verify."""


def make_root(
    signer: CryptoSigner, *, lifetime: timedelta = ROOT_LIFETIME, expires: datetime | None = None
) -> bytes:
    """Root metadata (version 1) giving ``signer``'s public key every role, signed by it;
    it expires after ``lifetime`` (or at ``expires``, for reproducible test vectors)."""
    expires = (expires or datetime.now(timezone.utc) + lifetime).replace(microsecond=0)
    root = Root(expires=expires)
    for role in ROLES:
        root.add_key(signer.public_key, role)
    md = Metadata(root)
    md.sign(signer)
    return md.to_bytes(JSONSerializer(compact=False))


def generate_release_key(folder: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new ``release-key.pem`` (mode 600) and its ``root.json`` into ``folder``.

    Returns (key path, root path). Raises :class:`ReleaseKeyError` if a key exists and
    ``overwrite`` is false: replacing it would make every device refuse new releases.
    """
    out = Path(folder)
    key_path, root_path = out / KEY_FILE, out / ROOT_FILE
    if key_path.exists() and not overwrite:
        raise ReleaseKeyError(
            f"{key_path} exists; devices trust it through {root_path}. Keep it, or pass "
            "overwrite to replace it (then copy the new root.json to every device)"
        )
    signer = CryptoSigner.generate_ed25519()
    atomic_write_bytes(key_path, signer.private_bytes, mode=0o600)
    atomic_write_bytes(root_path, make_root(signer))
    return key_path, root_path


def load_signer(path: str | Path) -> CryptoSigner:
    """The release key written by :func:`generate_release_key`."""
    p = Path(path)
    try:
        key = load_pem_private_key(p.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ReleaseKeyError(f"cannot read the release key {p} ({e})") from e
    try:
        return CryptoSigner(key)
    except (ValueError, TypeError) as e:
        raise ReleaseKeyError(f"{p} is not an Ed25519 release key ({e})") from e


def parse_root(data: bytes, source: str = "root metadata") -> Root:
    """Root metadata, checked to be well formed and signed by its own root keys."""
    if len(data) > MAX_ROOT_BYTES:
        raise ReleaseKeyError(f"{source}: {len(data)} bytes exceeds the {MAX_ROOT_BYTES} cap")
    try:
        md = Metadata[Root].from_bytes(data)
    except (DeserializationError, ValueError, TypeError, KeyError) as e:
        raise ReleaseKeyError(f"{source} is not TUF root metadata ({e})") from e
    if not isinstance(md.signed, Root):
        raise ReleaseKeyError(f"{source} holds {md.signed.type} metadata, not root")
    try:
        payload = CanonicalJSONSerializer().serialize(md.signed)
        md.signed.verify_delegate("root", payload, md.signatures)
    except UnsignedMetadataError as e:
        raise ReleaseKeyError(f"{source} is not signed by its own root key ({e})") from e
    return md.signed


def load_root(path: str | Path) -> Root:
    """The fleet's ``root.json`` as a device holds it (``--release-root``)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ReleaseKeyError(f"cannot read the release root {p} ({e})") from e
    return parse_root(data, str(p))


def key_matches_root(signer: CryptoSigner, root: Root) -> bool:
    """True if ``signer`` is one of the keys ``root`` trusts for releases."""
    return signer.public_key.keyid in root.roles["targets"].keyids
