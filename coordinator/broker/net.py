"""Loopback port helpers for the brokers."""

from __future__ import annotations

import ipaddress
import socket
import time

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    """True for a literal loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """True if a TCP connection to ``host:port`` succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float) -> bool:
    """Wait until ``host:port`` accepts connections; False after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if port_accepts(host, port):
            return True
        time.sleep(0.05)
    return False
