"""A fleet's TLS material, made with the ``openssl`` command: a CA and a server
certificate for the broker's host names and addresses.

``make_fleet_tls(directory, hosts)`` writes::

    ca.crt       the fleet CA certificate: copy it to every device (--ca-file)
    ca.key       its private key (mode 600): keep it on the coordinator host, offline if you can
    server.crt   the broker's certificate, signed by the CA, for every name in ``hosts``
    server.key   its private key (mode 600), read by Mosquitto

Keys are ECDSA P-256. A host that parses as an IP address goes into the certificate as
an IP entry, anything else as a DNS name.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from coordinator.broker.errors import BrokerStartError
from takfl.wire.topics import check_ident

OPENSSL = "openssl"
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest validity clients commonly accept for a server certificate
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.crt", "server.key"


@dataclass(frozen=True, kw_only=True)
class FleetTls:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...]


def tls_listen_addresses(
    tls_hosts: list[str], listen: list[str] | None, plain_host: str
) -> tuple[str, ...]:
    """Where the broker's TLS listeners bind: the ``listen`` addresses when given; else
    the ``tls_hosts`` that are IP addresses (agents connect to them, so the broker must
    listen there); else the plain listener's ``plain_host`` (loopback by default)."""
    if listen:
        return tuple(dict.fromkeys(listen))
    literal = [h for h in tls_hosts if san_entry(h).startswith("IP:")]
    return tuple(dict.fromkeys(literal)) or (plain_host,)


def san_entry(host: str) -> str:
    """``IP:...`` for an address, ``DNS:...`` for a name (ValueError for neither)."""
    try:
        return f"IP:{ipaddress.ip_address(host)}"
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or any(not label for label in labels):
        raise ValueError(f"{host!r} is neither an IP address nor a host name")
    for label in labels:
        check_ident(label.replace("*", "x"), "host name label")
    return f"DNS:{host}"


def _openssl(*args: str | Path) -> None:
    tool = shutil.which(OPENSSL)
    if tool is None:
        raise BrokerStartError("openssl not found: install it (apt install openssl)")
    try:
        subprocess.run(
            [tool, *map(str, args)], check=True, capture_output=True, text=True, timeout=60
        )
    except subprocess.CalledProcessError as e:
        raise BrokerStartError(f"openssl {args[0]} failed: {e.stderr.strip()[-500:]}") from e


def make_fleet_tls(directory: str | Path, hosts: list[str], *, fleet: str = "takfl") -> FleetTls:
    """A new CA and a server certificate for ``hosts`` in ``directory`` (see module doc)."""
    if not hosts:
        raise ValueError("give at least one host name or address for the server certificate")
    entries = [san_entry(h) for h in hosts]
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key, cert, key = d / CA_CERT, d / CA_KEY, d / SERVER_CERT, d / SERVER_KEY
    csr, ext = d / "server.csr", d / "server.ext"
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_cert, "-days", str(CA_DAYS),
        "-subj", f"/CN={fleet} fleet CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )  # fmt: skip
    _openssl("req", "-new", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={hosts[0]}")
    ext.write_text(
        f"subjectAltName={','.join(entries)}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", str(SERVER_DAYS), "-extfile", ext,
    )  # fmt: skip
    for p in (ca_key, key):
        os.chmod(p, 0o600)
    for p in (csr, ext, d / "ca.srl"):
        p.unlink(missing_ok=True)
    return FleetTls(
        ca_cert=ca_cert, ca_key=ca_key, server_cert=cert, server_key=key, hosts=tuple(hosts)
    )
