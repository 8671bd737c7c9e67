"""The agent process's memory as the OS reports it. Standard library only: the
inference service reads it without importing torch."""

from __future__ import annotations

import sys


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    try:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except OSError:
        return None
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024
