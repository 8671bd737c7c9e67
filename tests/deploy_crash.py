"""An install on a device that SIGKILLs itself at a chosen write.

    python -m tests.deploy_crash FIXTURES STATE POINT

FIXTURES holds ``root.json``, ``offer.json`` (a signed ReleaseOffer) and ``blobs/<sha256>``
(the artifacts); STATE is the device's ``--state-dir``. POINT is ``after:NAME`` (killed
right after the slot store's atomic write of the file NAME completed), ``before:NAME``
(killed inside that write, its temp file written, before the rename) or ``none``. A real
SIGKILL at a precise place, with no hook in the code under test (as tests/crash_run.py).
Prints the states it reported when it is not killed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import edge_agent.deploy.slots as slots
from takfl.release.keys import load_root
from takfl.wire.messages import decode_message
from takfl.wire.release import ReleaseOffer
from tests.release_fixtures import feed, installer


def kill_at(point: str) -> None:
    """Arm a SIGKILL of this process at ``point`` (see the module docstring)."""
    if point == "none":
        return
    when, _, name = point.partition(":")
    if when == "after":
        original = slots.atomic_write_bytes

        def write_then_die(path: Any, data: bytes, **kwargs: Any) -> None:
            original(path, data, **kwargs)
            if Path(path).name == name:
                os.kill(os.getpid(), signal.SIGKILL)

        slots.atomic_write_bytes = write_then_die
    elif when == "before":
        replace = os.replace

        def die_before_rename(src: Any, dst: Any, **kwargs: Any) -> None:
            if Path(dst).name == name:
                os.kill(os.getpid(), signal.SIGKILL)
            replace(src, dst, **kwargs)

        os.replace = die_before_rename
    else:
        raise SystemExit(f"unknown point {point!r}")


def main() -> None:
    fixtures, state, point = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    root = load_root(fixtures / "root.json")
    message = decode_message(ReleaseOffer, (fixtures / "offer.json").read_bytes())
    blobs = {p.name: p.read_bytes() for p in (fixtures / "blobs").iterdir()}
    inst = installer(state, root)
    kill_at(point)
    reports = feed(inst, message, blobs)
    print(json.dumps([r.state for r in reports]))


if __name__ == "__main__":
    main()
