"""Control lines between the benchmark's orchestrator and its child processes.

A child is the benchmark script run again in another mode (``--worker`` or
``--coordinator`` with a JSON spec file); the two talk over the child's stdin and
stdout, one word per line, optionally followed by JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO, Any

READY = "ready"  # child: set up, waiting for GO
GO = "go"  # orchestrator: start (coordinator: connect and time; worker: connect agents)
STARTED = "started"  # child: connected
STOP = "stop"  # orchestrator to a worker: close the agents
DONE = "done"  # coordinator: the record follows
STOPPED = "stopped"  # worker: the agents' counters follow
PROGRESS = "progress"  # coordinator: a line for the console
EOF = "eof"  # the other side's pipe closed


class BenchError(RuntimeError):
    """A phase of the benchmark did not complete; the message says which and why."""


def jsonable(value: Any) -> Any:
    """``value`` with every mapping key JSON can hold: a tuple key (e.g. ``(round,
    prototype)``) becomes its parts joined by "/", any other key its ``str``."""
    if isinstance(value, dict):
        return {_key(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def _key(key: Any) -> Any:
    if isinstance(key, str | int | float | bool) or key is None:
        return key
    if isinstance(key, tuple):
        return "/".join(str(k) for k in key)
    return str(key)


def say(word: str, payload: Any = None) -> None:
    """One control line to the orchestrator: ``word`` and optional JSON."""
    line = word if payload is None else f"{word} {json.dumps(jsonable(payload))}"
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def read_commands(stream: IO[str]) -> queue.Queue[str]:
    """Lines of ``stream`` in a queue, ``"eof"`` last (the other side went away)."""
    commands: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            commands.put(line.strip())
        commands.put(EOF)

    threading.Thread(target=pump, name="commands", daemon=True).start()
    return commands


def await_command(commands: queue.Queue[str], word: str, timeout: float) -> None:
    """Wait for ``word`` from the orchestrator; BenchError on anything else or timeout."""
    try:
        got = commands.get(timeout=timeout)
    except queue.Empty:
        raise BenchError(f"no {word!r} from the orchestrator within {timeout:g} s") from None
    if got != word:
        raise BenchError(f"expected {word!r} from the orchestrator, got {got!r}")


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit so ``finally`` blocks close links and transports."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


class Child:
    """``script`` in another ``mode`` as a child process, driven by control lines; its
    spec is written to ``work/<name>.json`` (owner-only: it holds secrets), its stderr
    to ``work/<name>.log``."""

    def __init__(self, name: str, mode: str, spec: dict[str, Any], work: Path, script: Path):
        self.name = name
        spec_path = work / f"{name}.json"
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f)
        self.log = work / f"{name}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), mode, str(spec_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        if self.proc.stdout is None:
            raise BenchError(f"{name}: no pipe to its standard output")
        self.lines = read_commands(self.proc.stdout)

    def send(self, word: str) -> None:
        if self.proc.stdin is None:
            return
        with contextlib.suppress(BrokenPipeError, OSError, ValueError):
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()

    def expect(
        self, word: str, timeout: float, progress: Callable[[str], None] | None = None
    ) -> Any:
        """The JSON after the next ``word`` line; BenchError on timeout or exit."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no {word!r} within {timeout:g} s{self.tail()}")
            try:
                line = self.lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line == EOF:
                code = self.proc.wait(10)
                raise BenchError(f"{self.name} exited ({code}) before {word!r}{self.tail()}")
            head, _, rest = line.partition(" ")
            if head == PROGRESS and progress is not None:
                progress(f"{self.name}: {json.loads(rest)}")
            elif head == word:
                return json.loads(rest) if rest else None

    def tail(self, chars: int = 1500) -> str:
        try:
            text = self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
        return f"; log tail:\n{text}" if text.strip() else ""

    def stop(self, timeout: float = 30.0) -> None:
        """Close its stdin (it stops on its own), then SIGTERM, then SIGKILL."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        for action in (None, self.proc.terminate, self.proc.kill):
            if action is not None:
                action()
            try:
                self.proc.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                continue
