"""A takfl process that speaks another protocol version: a test double of a peer built
from a later minor (or another major) version.

    python -m tests.protocol_double 1.1 edge_agent.cli run ...
    python -m tests.protocol_double 1.1 coordinator.cli serve ...

It sets the version the process speaks (``takfl.wire.version.PROTOCOL``) and, as a later
minor may, adds an optional field, ``"x_double": {"speaks": <version>}``, to every
message it builds, so the field is signed and sent; what it receives it reads by the
version rule of the version it speaks. Then it runs ``MODULE`` as ``__main__``.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

from takfl.wire import envelope, version

EXTRA = "x_double"


def speak(protocol: str) -> None:
    """Make every message this process builds one of ``protocol``, with the extra field."""
    version.PROTOCOL = protocol
    built = envelope.SignedMessage.wire_object

    def wire_object(self: envelope.SignedMessage) -> dict[str, Any]:
        obj = built(self)
        if self._received is None:  # built here, not received
            obj[EXTRA] = {"speaks": protocol}
        return obj

    envelope.SignedMessage.wire_object = wire_object  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    protocol, module, *args = argv
    speak(protocol)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
