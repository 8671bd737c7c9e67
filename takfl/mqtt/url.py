"""Broker addresses as URLs: ``mqtt://[user@]host[:port]`` or ``mqtts://...``.

Passwords never travel on a command line (every local user can read it in the process
list): they come from a file or from the environment (:func:`read_password`).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

from takfl.mqtt.client import MqttSettings, TlsSettings

PASSWORD_ENV = "TAKFL_BROKER_PASSWORD"  # the broker password, when no file is given


def parse_broker_url(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    allow_password_in_url: bool = False,
) -> MqttSettings:
    """MqttSettings for ``url``; explicit username/password override those in the URL.

    ``mqtts`` turns TLS on (port 8883 by default) with ``ca_file`` as the trust anchor
    (the system store when None) and an optional client certificate. A password inside
    the URL is refused (ValueError) unless ``allow_password_in_url``.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker URL {url!r} must look like mqtt://host:port or mqtts://host:port")
    if parts.password and not allow_password_in_url:
        raise ValueError(
            "the broker URL holds a password, which every local user can read in the process "
            f"list; give mqtt[s]://USER@host:port and put the password in a file "
            f"(--password-file, mode 600) or in ${PASSWORD_ENV}"
        )
    if (cert_file is None) != (key_file is None):
        raise ValueError("give both a client certificate and its key, or neither")
    if parts.scheme != "mqtts" and (ca_file or cert_file):
        raise ValueError(f"a CA file or client certificate needs an mqtts:// URL, not {url!r}")
    tls = (
        TlsSettings(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        if parts.scheme == "mqtts"
        else None
    )
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as e:
        raise ValueError(f"broker URL {url!r} has a bad port") from e
    return MqttSettings(
        host=parts.hostname,
        port=port,
        username=username
        if username is not None
        else (unquote(parts.username) if parts.username else None),
        password=password
        if password is not None
        else (unquote(parts.password) if parts.password else None),
        tls=tls,
    )


def read_password(path: str | Path | None, *, env: str = PASSWORD_ENV) -> str | None:
    """The password in ``path`` (first line), else ``$env``, else None.

    ValueError when the file cannot be read or is empty.
    """
    if path is None:
        value = os.environ.get(env)
        return value or None
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        mode = p.stat().st_mode
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read password file {p} ({e})") from e
    lines = text.splitlines()
    password = lines[0].strip() if lines else ""
    if not password:
        raise ValueError(f"password file {p} is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logging.getLogger(__name__).warning(
            "password file %s is readable by other users; chmod 600 it", p
        )
    return password
