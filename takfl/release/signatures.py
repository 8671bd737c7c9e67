"""Detached Ed25519 signatures of small JSON documents (export sidecars) with the fleet's
release key, verified against the fleet's TUF root like a release.

A signed document is the document plus ``"signatures": [{"keyid": ..., "sig": ...}]``;
what is signed is its canonical JSON without that key, the wire protocol's form
(:func:`takfl.wire.canonical.canonical_bytes`: keys sorted, no spaces, non-ASCII escaped,
floats as Python writes them; the documents hold floats, which TUF's own canonical form
refuses). The check is the root's
``targets`` role: the same key, threshold and verification as release metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from securesystemslib.signer import Signature, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Root

from takfl.release.metadata import RELEASE_ROLE
from takfl.wire.canonical import canonical_bytes

SIGNATURES = "signatures"


class SignatureError(ValueError):
    """A document is unsigned, or not signed by a key the root trusts for releases."""


def signed_payload(doc: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the canonical JSON of ``doc`` without its signatures."""
    body = {k: v for k, v in doc.items() if k != SIGNATURES}
    return canonical_bytes(body)


def sign_document(doc: Mapping[str, Any], signer: Signer) -> dict[str, Any]:
    """``doc`` with its signature by ``signer`` (any earlier signatures replaced)."""
    signature = signer.sign(signed_payload(doc))
    return {**doc, SIGNATURES: [signature.to_dict()]}


def verify_document(doc: Mapping[str, Any], root: Root) -> None:
    """Raise :class:`SignatureError` unless ``doc`` carries enough valid signatures by
    the keys ``root`` trusts for releases."""
    raw = doc.get(SIGNATURES)
    if not raw:
        raise SignatureError("it carries no signature")
    try:
        signatures = {s["keyid"]: Signature.from_dict(dict(s)) for s in raw}
    except (KeyError, TypeError, ValueError) as e:
        raise SignatureError(f"its signatures are malformed ({e})") from e
    try:
        root.verify_delegate(RELEASE_ROLE, signed_payload(doc), signatures)
    except UnsignedMetadataError as e:
        raise SignatureError(f"it is not signed by the fleet's release key ({e})") from e
