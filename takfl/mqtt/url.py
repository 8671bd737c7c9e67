"""Broker addresses as URLs: ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...``."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from takfl.mqtt.client import MqttSettings, TlsSettings


def parse_broker_url(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
) -> MqttSettings:
    """MqttSettings for ``url``; explicit username/password override those in the URL.

    ``mqtts`` turns TLS on (port 8883 by default) with ``ca_file`` as the trust anchor
    (the system store when None).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker URL {url!r} must look like mqtt://host:port or mqtts://host:port")
    tls = TlsSettings(ca_file=ca_file) if parts.scheme == "mqtts" else None
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
