"""``takfl-agent profiles`` and ``takfl-agent validate``, in process and as the installed
console script."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edge_agent.cli import EXIT_CONFIG, app, inference_cell, model_cell, training_cell
from takfl.config import ModelSpec, bundled_names, load_profile

# Wide enough that no table cell is folded; plain text whatever the CI's terminal settings.
WIDE = {"COLUMNS": "200", "NO_COLOR": "1", "FORCE_COLOR": "", "TTY_COMPATIBLE": "0"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
BAD_PROFILE = {
    "name": "broken-board",
    "prototype": "S",
    "model": {"builder": "resnet99"},
    "training": {"epochs": "many", "batch_size": -3},
    "colour": "red",
}
BAD_PROBLEMS = [
    "hardware_class: Field required",
    "model.builder: unknown model 'resnet99'",
    "training.epochs: Input should be a valid integer",
    "training.batch_size: Input should be greater than 0",
    "colour: unknown key",
]


def plain(text: str) -> str:
    return ANSI.sub("", text)


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, list(args), env={**WIDE, **(env or {})})


# --- formatting helpers ----------------------------------------------------------------


def test_cells_describe_a_profile() -> None:
    phone = load_profile("android-phone")

    assert model_cell(phone.model) == "mobilenetv2 norm=group width_mult=0.5"
    assert model_cell(ModelSpec(builder="resnet8")) == "resnet8"
    assert training_cell(phone) == "1/16/2"
    assert inference_cell(phone) == "ai-edge-litert tflite int8"


# --- in process ------------------------------------------------------------------------


def test_profiles_lists_every_bundled_profile() -> None:
    result = invoke("profiles")

    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in plain(result.stdout).splitlines() if line}
    for name in bundled_names("devices"):
        profile = load_profile(name)
        row = rows[name]
        assert row[1] == profile.prototype
        assert row[2] == profile.hardware_class
        assert row[3] == profile.model.builder
        assert training_cell(profile) in row
        assert profile.inference.runtime in row
        assert row[-1] == profile.comms.compression


def test_profiles_table_at_the_default_width_keeps_names_whole() -> None:
    result = invoke("profiles", env={"COLUMNS": "80"})

    assert result.exit_code == 0
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    for name in bundled_names("devices"):
        assert name in result.stdout


def test_validate_bundled_name_prints_a_summary() -> None:
    result = invoke("validate", "raspberry-pi-4")

    assert result.exit_code == 0, result.output
    out = plain(result.stdout)
    assert "raspberry-pi-4: valid device profile" in out
    assert "prototype S, raspberry-pi" in out
    assert "resnet8" in out
    assert "1 epoch(s), batch 16, adam lr 0.001, 4 thread(s); memory 1024 MB" in out
    assert "int8 updates, 128 KiB chunks, QoS 1" in out


def test_validate_a_good_file(write_yaml: Any) -> None:
    good = {
        "name": "my-board",
        "prototype": "M",
        "hardware_class": "jetson",
        "model": {"builder": "cnn_digits_small"},
    }
    path = write_yaml("board.yaml", good)

    result = invoke("validate", str(path))

    assert result.exit_code == 0, result.output
    assert "valid device profile" in result.stdout
    assert "cnn_digits_small" in result.stdout


def test_validate_bad_file_lists_every_problem_and_exits_2(write_yaml: Any) -> None:
    path = write_yaml("bad.yaml", BAD_PROFILE)

    result = invoke("validate", str(path))

    assert result.exit_code == EXIT_CONFIG == 2
    err = plain(result.stderr)
    assert f"{path} is not a valid device profile (5 problem(s))" in err
    for line in BAD_PROBLEMS:
        assert f"  {line}" in err
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_problems_are_printed_in_red(write_yaml: Any) -> None:
    path = write_yaml("bad.yaml", BAD_PROFILE)

    colour = {"FORCE_COLOR": "1", "NO_COLOR": "", "TTY_COMPATIBLE": ""}
    result = invoke("validate", str(path), env=colour)

    assert result.exit_code == 2
    red_lines = re.findall(r"\x1b\[(?:[0-9;]*;)?31m  ([^\x1b]*)", result.stderr)
    assert len(red_lines) == len(BAD_PROBLEMS)
    for line in BAD_PROBLEMS:
        assert any(r.startswith(line) for r in red_lines)


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("no-such-board", "no such file and no bundled devices entry"),
        ("absent.yaml", "file not found"),
    ],
)
def test_validate_missing_profile_exits_2(
    target: str, fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    result = invoke("validate", target)

    assert result.exit_code == 2
    assert fragment in plain(result.stderr)
    assert "Traceback" not in result.output


def test_validate_invalid_yaml_exits_2(write_yaml: Any) -> None:
    path = write_yaml("broken.yaml", "name: [unclosed\n")

    result = invoke("validate", str(path))

    assert result.exit_code == 2
    assert "not valid YAML" in plain(result.stderr)


def test_no_arguments_shows_the_commands() -> None:
    result = invoke()

    assert "profiles" in result.output
    assert "validate" in result.output


def test_version() -> None:
    result = invoke("--version")

    assert result.exit_code == 0
    assert re.match(r"takfl-agent \d+\.\d+", result.stdout)


# --- the installed console script ------------------------------------------------------


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    # The script sits beside the interpreter running the tests (a venv's bin/), which need not
    # be on PATH: `.venv/bin/python -m pytest` is how the README runs the suite.
    beside = Path(sys.executable).with_name("takfl-agent")
    exe = str(beside) if beside.exists() else shutil.which("takfl-agent")
    assert exe is not None, "takfl-agent is not installed: pip install -c constraints.txt -e ."
    env = {**os.environ, **WIDE}
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_console_script_profiles() -> None:
    result = run_script("profiles")

    assert result.returncode == 0, result.stderr
    for name in bundled_names("devices"):
        assert name in result.stdout
    assert "Bundled device profiles" in result.stdout


def test_console_script_bad_file_exits_2_without_traceback(write_yaml: Any) -> None:
    path = write_yaml("bad.yaml", BAD_PROFILE)

    result = run_script("validate", str(path))

    assert result.returncode == 2
    for line in BAD_PROBLEMS:
        assert line in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
