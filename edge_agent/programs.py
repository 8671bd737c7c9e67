"""Training programs an agent holds, by SHA-256 digest (the coordinator ships the same
program every round of a prototype, so it travels once)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict


class ProgramCache:
    """At most ``max_programs`` programs in memory, least recently used dropped first.
    Not thread-safe: used from the link's dispatcher thread."""

    def __init__(self, max_programs: int = 2) -> None:
        if max_programs < 1:
            raise ValueError("max_programs must be at least 1")
        self.max_programs = max_programs
        self._programs: OrderedDict[str, bytes] = OrderedDict()

    def get(self, digest: str) -> bytes | None:
        program = self._programs.get(digest)
        if program is not None:
            self._programs.move_to_end(digest)
        return program

    def put(self, blob: bytes) -> str:
        """Keep ``blob``; returns its digest."""
        digest = hashlib.sha256(blob).hexdigest()
        self._programs[digest] = blob
        self._programs.move_to_end(digest)
        while len(self._programs) > self.max_programs:
            self._programs.popitem(last=False)
        return digest

    def __contains__(self, digest: object) -> bool:
        return digest in self._programs
