"""HTTP/1.1 servers around :class:`~edge_agent.serving.app.InferenceApp`: TCP on
loopback by default, or a UNIX socket. Standard library only (``http.server``), one
thread per connection.

The body size is checked from Content-Length before anything is read (413), a request
without one is refused (411), a client that stalls is dropped after ``timeout_s``, and a
handler error is answered with 500: nothing a client sends takes the service down.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import socketserver
import stat
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from edge_agent.serving.app import InferenceApp, Response, error

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8500"
SOCKET_MODE = 0o660  # the service's user and group may connect


@dataclass(frozen=True)
class TcpEndpoint:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class UnixEndpoint:
    path: Path

    def __str__(self) -> str:
        return f"unix:{self.path}"


Endpoint = TcpEndpoint | UnixEndpoint


def parse_listen(text: str) -> TcpEndpoint:
    """``HOST:PORT`` (``[::1]:8500`` for IPv6) as an endpoint; ValueError when malformed."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    try:
        port = int(port_text)
    except ValueError as e:
        raise ValueError(f"--listen {text!r}: the port must be a number") from e
    if not 0 <= port <= 65535:
        raise ValueError(f"--listen {text!r}: port out of range")
    return TcpEndpoint(host, port)


class _Handler(BaseHTTPRequestHandler):
    """Reads one request, asks the app, writes its answer."""

    protocol_version = "HTTP/1.1"  # keep-alive; every answer has a Content-Length
    server_version = "takfl-agent"
    app: InferenceApp  # set on the subclass each server makes

    def do_GET(self) -> None:
        self._serve(b"")

    def do_POST(self) -> None:
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            self._send(error(411, "send a Content-Length"), close=True)
            return
        try:
            length = int(length_text)
            if length < 0:
                raise ValueError(length_text)
        except ValueError:
            self._send(error(400, f"bad Content-Length {length_text!r}"), close=True)
            return
        if length > self.app.limits.max_body_bytes:
            self._send(self.app.oversized(self.path), close=True)  # body left unread
            return
        self._serve(self.rfile.read(length))

    def _serve(self, body: bytes) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        self._send(self.app.handle(self.command, self.path, headers, body))

    def _send(self, response: Response, *, close: bool = False) -> None:
        payload = response.encoded()
        self.send_response(response.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(payload)

    def address_string(self) -> str:
        client = self.client_address
        return str(client[0]) if isinstance(client, tuple) and client else "local"

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _TcpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False


def _handler_for(app: InferenceApp, timeout_s: float) -> type[_Handler]:
    return type("Handler", (_Handler,), {"app": app, "timeout": timeout_s})


def _unix_server(path: Path, handler: type[_Handler]) -> _UnixServer:
    if path.exists():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ValueError(f"--socket {path}: a file that is not a socket is in the way")
        path.unlink()  # left by a service that did not stop cleanly
    path.parent.mkdir(parents=True, exist_ok=True)
    server = _UnixServer(str(path), handler)
    os.chmod(path, SOCKET_MODE)
    return server


class LocalServer:
    """The inference endpoints on ``endpoint``, served on a background thread.

    A TCP endpoint that is not loopback is served as asked and said so in the log: the
    model then answers anyone who can reach the device.
    """

    def __init__(self, app: InferenceApp, endpoint: Endpoint, *, timeout_s: float = 30.0) -> None:
        handler = _handler_for(app, timeout_s)
        self._server: socketserver.BaseServer
        if isinstance(endpoint, UnixEndpoint):
            self._server = _unix_server(endpoint.path, handler)
        else:
            cls = _Tcp6Server if ":" in endpoint.host else _TcpServer
            self._server = cls((endpoint.host, endpoint.port), handler)
            bound = self._server.server_address
            endpoint = TcpEndpoint(endpoint.host, int(bound[1]))
            if not endpoint.loopback:
                log.warning(
                    "the inference service listens on %s, beyond this device: anyone who "
                    "can reach it can query the model",
                    endpoint,
                )
        self.endpoint: Endpoint = endpoint
        self._thread: threading.Thread | None = None

    def start(self) -> LocalServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="inference-http", daemon=True
        )
        self._thread.start()
        log.info("inference service on %s", self.endpoint)
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()
        if isinstance(self.endpoint, UnixEndpoint):
            self.endpoint.path.unlink(missing_ok=True)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()
