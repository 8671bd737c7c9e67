"""Headless Chromium (Debian's ``chromium`` package) for checking generated pages.

``render`` loads a local file, writes a screenshot and returns every console message
the page produced: Chromium logs each one on stderr as ``...:CONSOLE:<line>] "text",
source: <url> (<line>)`` under ``--enable-logging=stderr --v=0`` (errors and uncaught
exceptions included; tests/test_report.py checks that this capture sees them).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]\s*(.*)$")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--hide-scrollbars",
)


def render(page: Path, screenshot: Path, size: tuple[int, int] = (1200, 2600)) -> list[str]:
    """Console messages of ``page`` after load; the screenshot is written to ``screenshot``."""
    if CHROMIUM is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="takfl-chromium-") as profile:
        proc = subprocess.run(
            [
                CHROMIUM,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}",
                f"--screenshot={screenshot}",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
    if proc.returncode != 0 or not screenshot.is_file():
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return [m.group(1) for line in proc.stderr.splitlines() if (m := _CONSOLE.search(line))]
