"""House rules that a reader of the source can check: a run-directory file name is
declared in takfl/run_layout.py only, and a dataclass of more than three fields is
keyword-only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from takfl import run_layout

ROOT = Path(__file__).resolve().parent.parent
RUN_FILES = {
    run_layout.CONFIG_FILE,
    run_layout.STATE_FILE,
    run_layout.METRICS_FILE,
    run_layout.TELEMETRY_FILE,
    run_layout.REPORT_HTML,
    run_layout.REPORT_JSON,
    run_layout.EXPORT_REPORT,
    run_layout.RESULTS_FILE,
    run_layout.PLOT_FILE,
}


def sources(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def run_file_literals(path: Path) -> list[str]:
    """String constants in ``path`` that are (or end in) a run-directory file name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        text = node.value if isinstance(node, ast.Constant) else None
        if isinstance(text, str) and any(text == n or text.endswith("/" + n) for n in RUN_FILES):
            found.append(f"{path}:{node.lineno} {node.value!r}")
    return found


def test_run_directory_names_are_declared_in_the_layout_module_only() -> None:
    layout = Path(run_layout.__file__).resolve()
    stray = [
        hit
        for path in sources("takfl", "coordinator", "edge_agent", "export", "benchmarks")
        if path.resolve() != layout
        for hit in run_file_literals(path)
    ]
    assert stray == []


def test_the_check_finds_a_stray_name(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text('STATE = "state.json"\nPATH = "run/metrics.jsonl"\nOTHER = "notes.json"\n')

    assert [hit.split(" ")[1] for hit in run_file_literals(path)] == [
        "'state.json'",
        "'run/metrics.jsonl'",
    ]


def positional_dataclasses(path: Path) -> list[str]:
    """Dataclasses in ``path`` with more than three fields that are not keyword-only."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ClassDef):
            continue
        for deco in node.decorator_list:
            target = deco.func if isinstance(deco, ast.Call) else deco
            if getattr(target, "id", getattr(target, "attr", None)) != "dataclass":
                continue
            kw_only = isinstance(deco, ast.Call) and any(
                k.arg == "kw_only" and getattr(k.value, "value", None) is True
                for k in deco.keywords
            )
            fields = [s for s in node.body if isinstance(s, ast.AnnAssign)]
            if len(fields) > 3 and not kw_only:
                out.append(f"{path}:{node.lineno} {node.name}")
    return out


def test_the_check_finds_a_positional_dataclass(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(
        "from dataclasses import dataclass\n"
        "@dataclass(frozen=True)\nclass Wide:\n    a: int\n    b: int\n    c: int\n    d: int\n"
        "@dataclass(kw_only=True)\nclass Named:\n    a: int\n    b: int\n    c: int\n    d: int\n"
        "@dataclass\nclass Narrow:\n    a: int\n    b: int\n    c: int\n"
    )

    assert [hit.split(" ")[1] for hit in positional_dataclasses(path)] == ["Wide"]


@pytest.mark.parametrize("package", ["takfl", "coordinator"])
def test_dataclasses_of_more_than_three_fields_are_keyword_only(package: str) -> None:
    assert [hit for path in sources(package) for hit in positional_dataclasses(path)] == []
