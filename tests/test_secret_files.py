"""Secret files round-trip with mode 0600; bad, short or missing ones are refused."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from takfl.secret_files import load_secret_file, write_secret_file
from takfl.wire.errors import SecretError
from takfl.wire.signing import generate_secret

SECRET = b"k" * 32


def test_secret_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "agents" / "pi-1.secret"
    secret = write_secret_file(path)
    assert len(secret) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret_file(path) == secret
    with pytest.raises(SecretError, match="exists"):
        write_secret_file(path)
    assert write_secret_file(path, SECRET, overwrite=True) == SECRET
    assert load_secret_file(path) == SECRET
    assert generate_secret() != generate_secret()


@pytest.mark.parametrize("content", ["", "zz", "ab" * 16 + "a", "00" * 15])
def test_bad_secret_files_are_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "s"
    path.write_text(content)
    with pytest.raises(SecretError):
        load_secret_file(path)


def test_missing_secret_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="cannot read"):
        load_secret_file(tmp_path / "nope")
