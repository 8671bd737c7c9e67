"""Errors of the broker helpers."""

from __future__ import annotations


class BrokerStartError(RuntimeError):
    """A broker could not be started (port taken, bad config, binary missing...)."""
