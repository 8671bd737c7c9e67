"""The documentation site: it builds in strict mode (every link and anchor resolves, offline),
its generated reference pages cover every command and config field, and the README stays a
short front page whose test command is the one CI runs."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Literal

import pytest
import typer
from pydantic import BaseModel, Field

REPO = Path(__file__).resolve().parents[1]
HOOKS = REPO / "docs" / "hooks"


def load_hook_module(name: str) -> ModuleType:
    """A module of docs/hooks/, imported as MkDocs imports a hook: with its folder on
    sys.path while it loads, so that its sibling imports resolve."""
    spec = importlib.util.spec_from_file_location(f"takfl_docs_{name}", HOOKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as MkDocs does (dataclasses look their module up)
    saved = sys.path.copy()
    sys.path.insert(0, str(HOOKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


@pytest.fixture(scope="module")
def cli_pages() -> ModuleType:
    return load_hook_module("cli_pages")


@pytest.fixture(scope="module")
def config_pages() -> ModuleType:
    return load_hook_module("config_pages")


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    return load_hook_module("reference")


@pytest.fixture(scope="module")
def pages(reference: ModuleType) -> dict[str, str]:
    return reference.generated_pages()


def section(page: str, heading: str) -> str:
    """The text of ``page`` from the heading line ``heading`` to the next heading of
    the same or a higher level."""
    lines = page.splitlines()
    start = lines.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    end = next(
        (i for i in range(start + 1, len(lines)) if re.match(rf"^#{{1,{level}}} ", lines[i])),
        len(lines),
    )
    return "\n".join(lines[start:end])


# --- the site -------------------------------------------------------------------------


def test_site_builds_in_strict_mode_offline(tmp_path: Path) -> None:
    # Prepare: this checkout's code first on the path (the hook imports the CLIs and models)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "NO_MKDOCS_2_WARNING": "1",
    }
    site = tmp_path / "site"
    # Execute
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Assert
    assert done.returncode == 0, done.stdout + done.stderr
    serve = (site / "reference" / "cli" / "takfl-coordinator" / "index.html").read_text()
    assert "takfl-coordinator serve" in serve and "--password-file" in serve
    assert (site / "reference" / "federation-config" / "index.html").is_file()
    assert (site / "how-to" / "boards" / "raspberry-pi" / "index.html").is_file()
    assert (site / "results" / "plots" / "lambdas-digits-takfl-reg.png").is_file()
    assert not (site / "hooks").exists()  # the generator is not published


# --- generated CLI reference ----------------------------------------------------------

PROGRAMS = {
    "takfl-coordinator": ("reference/cli/takfl-coordinator.md", "coordinator.cli"),
    "takfl-agent": ("reference/cli/takfl-agent.md", "edge_agent.cli"),
    "takfl-export": ("reference/cli/takfl-export.md", "export.cli"),
}


@pytest.mark.parametrize(
    ("prog", "commands"),
    [
        ("takfl-coordinator", ["serve", "provision", "simulate", "demo", "report", "status"]),
        ("takfl-agent", ["run", "doctor", "predict", "profiles", "validate"]),
    ],
)
def test_cli_reference_has_the_named_commands(
    pages: dict[str, str], prog: str, commands: list[str]
) -> None:
    page = pages[PROGRAMS[prog][0]]
    for command in commands:
        assert f"## `{prog} {command}`" in page.splitlines()


@pytest.mark.parametrize("prog", sorted(PROGRAMS))
def test_cli_reference_has_every_command_and_option(pages: dict[str, str], prog: str) -> None:
    # Prepare: the click command tree, walked independently of the generator
    path, module = PROGRAMS[prog]
    root = typer.main.get_command(importlib.import_module(module).app)
    page = pages[path]
    subcommands = getattr(root, "commands", {})
    # Execute / Assert: every subcommand has its section, every option is in it
    for name, command in subcommands.items():
        text = section(page, f"## `{prog} {name}`")
        assert f"Usage: {prog} {name}" in text
        for param in command.params:
            for opt in [*param.opts, *param.secondary_opts]:
                shown = opt if opt.startswith("-") else opt.upper()
                assert shown in text or opt in text, f"{prog} {name}: {opt} missing"
    if not subcommands:  # a single-command program: its options are on the page itself
        for param in root.params:
            for opt in param.opts:
                assert f"`{opt}" in page, f"{prog}: {opt} missing"


def test_cli_reference_renders_help_defaults_and_ranges(pages: dict[str, str]) -> None:
    text = section(pages[PROGRAMS["takfl-coordinator"][0]], "## `takfl-coordinator simulate`")
    assert "Simulate a federation in process" in text  # the command's docstring
    row = next(line for line in text.splitlines() if line.startswith("| `--seeds"))
    assert "Independent seeds" in row and "default: 1" in row and "x&gt;=1" in row
    # a help text with pipes stays in its cell
    row = next(line for line in text.splitlines() if line.startswith("| `--compression"))
    assert len(re.findall(r"(?<!\\)\|", row)) == 3 and "fp32\\|fp16\\|int8" in row


def test_cli_page_of_a_tiny_app(cli_pages: ModuleType) -> None:
    # Prepare
    app = typer.Typer()

    @app.command()
    def greet(name: str = typer.Argument(..., help="Who <to> greet."), loud: bool = False):
        """Say hello to NAME."""

    @app.command()
    def part(count: int = typer.Option(3, min=1, help="How many, e.g. 1|2.")):
        """Count things."""

    # Execute
    page = cli_pages.cli_page("tiny", app)
    # Assert
    assert page.startswith("# `tiny`\n")
    greet_text = section(page, "## `tiny greet`")
    assert "Say hello to NAME." in greet_text
    assert "Who &lt;to&gt; greet." in greet_text  # angle brackets do not become HTML
    assert "--loud / --no-loud" in greet_text
    part_text = section(page, "## `tiny part`")
    assert "1\\|2" in part_text and "default: 3" in part_text
    assert "[`greet`](#tiny-greet)" in page  # the program's list of commands links down


def test_escape_cell_keeps_code_spans_and_one_line(cli_pages: ModuleType) -> None:
    escape_cell = load_hook_module("markdown_text").escape_cell
    assert escape_cell("a <b>\n*c* `x<y`") == "a &lt;b&gt; \\*c\\* `x<y`"
    assert escape_cell("``RUN/x`` | y") == "`RUN/x` \\| y"


# --- generated configuration reference ------------------------------------------------


def config_roots() -> list[tuple[str, type[BaseModel]]]:
    """(generated page, root model) of each configuration file format."""
    from takfl.config import DeviceProfile, FederationConfig

    return [
        ("reference/federation-config.md", FederationConfig),
        ("reference/device-profile.md", DeviceProfile),
    ]


def test_config_reference_has_every_top_level_field(pages: dict[str, str]) -> None:
    for path, model in config_roots():
        text = section(pages[path], f"## {model.__name__} {{ #{model.__name__.lower()} }}")
        for name in model.model_fields:
            assert f"| `{name}` |" in text, f"{model.__name__}.{name} missing"


def test_config_reference_has_a_section_per_nested_model(
    pages: dict[str, str], config_pages: ModuleType
) -> None:
    for path, root in config_roots():
        found = config_pages.models_under(root)
        assert len(found) > 3
        for model, _ in found:
            assert f"## {model.__name__} {{ #{model.__name__.lower()} }}" in pages[path]


class Inner(BaseModel):
    """An inner block."""

    # the rate, per second,
    # over two lines
    rate: float = Field(0.5, gt=0, le=1)
    mode: Literal["a", "b"] = "a"  # which mode
    tags: list[str] = Field(default_factory=lambda: ["x"], description="Given explicitly.")


class Outer(BaseModel):
    # a comment that belongs to no field

    name: str

    inner: Inner = Inner()
    items: list[Inner] | None = None  # optional list


def test_models_under_lists_each_model_with_its_yaml_paths(config_pages: ModuleType) -> None:
    found = config_pages.models_under(Outer)
    assert found == [(Outer, [""]), (Inner, ["inner", "items[]"])]


def test_field_docs_take_descriptions_types_bounds_and_defaults(
    config_pages: ModuleType,
) -> None:
    # Execute
    inner = {row.name: row for row in config_pages.field_docs(Inner)}
    outer = {row.name: row for row in config_pages.field_docs(Outer)}
    # Assert: comments above and on the line, and Field(description=...)
    assert inner["rate"].description == "the rate, per second, over two lines"
    assert inner["mode"].description == "which mode"
    assert inner["tags"].description == "Given explicitly."
    assert outer["name"].description == ""  # a blank line cuts the comment block off
    # types with bounds, links to nested models
    assert inner["rate"].type == "`float`, &gt; 0, ≤ 1"
    assert inner["mode"].type == '`"a"` \\| `"b"`'
    assert outer["items"].type == "`list`[[Inner](#inner)] \\| `null`"
    # defaults as YAML spells them
    assert outer["name"].default == "required"
    assert inner["rate"].default == "`0.5`"
    assert inner["tags"].default == '`["x"]`'
    assert outer["inner"].default == "see [Inner](#inner)"
    assert outer["items"].default == "`null`"


def test_config_page_sections(config_pages: ModuleType) -> None:
    page = config_pages.config_page("Outer file", Outer, intro="Intro text.")
    assert page.startswith("# Outer file\n\nIntro text.\n")
    inner = section(page, "## Inner { #inner }")
    assert "Used at: `inner`, `items[]`." in inner
    assert "An inner block." in inner
    assert "| `rate` |" in inner


# --- files the site shows from elsewhere in the repository ----------------------------


def test_mirrored_files_exist(reference: ModuleType) -> None:
    files = reference.mirrored_files()
    assert "how-to/boards/raspberry-pi.md" in files
    assert any(site.startswith("results/plots/") for site in files)
    for site, source in files.items():
        assert source.is_file(), f"{site}: {source} is missing"


# --- README ---------------------------------------------------------------------------

README = REPO / "README.md"


def test_readme_is_a_short_front_page() -> None:
    assert len(README.read_text().splitlines()) < 250


def test_readme_test_command_is_the_one_ci_runs() -> None:
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    command = next(line for line in ci if "pytest" in line)
    assert any(line.startswith(command + " ") for line in README.read_text().splitlines())


def test_readme_links_resolve() -> None:
    text = README.read_text()
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert targets
    for target in targets:
        if "://" not in target:
            assert (REPO / target).exists(), f"README links to missing {target}"
