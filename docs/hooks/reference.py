"""MkDocs hook (``hooks:`` in mkdocs.yml): pages made at build time, so they cannot go stale.

- The CLI reference of ``takfl-coordinator``, ``takfl-agent`` and ``takfl-export``, from
  their typer apps (``cli_pages``).
- The federation config and device profile reference, from the pydantic models
  (``config_pages``).
- Files kept outside ``docs/`` that the site shows as they are: the per-hardware notes in
  ``firmware_notes/`` (and the agent's systemd unit) and the benchmark plots in
  ``benchmarks/results/``. Each has one home in the repository; the site links to it.

``generated_pages()`` returns {site path: Markdown} and is what the tests check; the
MkDocs event ``on_files`` adds those pages and the mirrored files to the build.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cli_pages import cli_page
from config_pages import config_page

if TYPE_CHECKING:
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files

REPO = Path(__file__).resolve().parents[2]

# Site path -> file in the repository, shown as a page of its own.
MIRRORED_PAGES = {
    "how-to/boards/raspberry-pi.md": "firmware_notes/raspberry-pi.md",
    "how-to/boards/jetson.md": "firmware_notes/jetson.md",
    "how-to/boards/microcontrollers.md": "firmware_notes/microcontrollers.md",
    "how-to/boards/android.md": "firmware_notes/android.md",
}
SYSTEMD_UNIT = "firmware_notes/systemd/takfl-agent.service"
SYSTEMD_PAGE = "how-to/boards/systemd.md"
PLOTS_DIR = "benchmarks/results"  # every *.png in it is served under results/plots/
PLOTS_SITE_DIR = "results/plots"

CLI_PAGES = {
    "reference/cli/takfl-coordinator.md": ("takfl-coordinator", "coordinator.cli"),
    "reference/cli/takfl-agent.md": ("takfl-agent", "edge_agent.cli"),
    "reference/cli/takfl-export.md": ("takfl-export", "export.cli"),
}


def cli_pages() -> dict[str, str]:
    """Site path -> CLI reference page, one per program."""
    import importlib

    pages = {}
    for path, (prog, module) in CLI_PAGES.items():
        app = importlib.import_module(module).app
        pages[path] = cli_page(prog, app)
    return pages


def config_reference_pages() -> dict[str, str]:
    """Site path -> configuration reference page, one per file format."""
    from takfl.config import DeviceProfile, FederationConfig

    return {
        "reference/federation-config.md": config_page(
            "Federation config",
            FederationConfig,
            intro="A federation config (`profiles/federations/*.yaml`, or any YAML file "
            "given by path to `--config`) describes the data, the partition, the prototypes "
            "and their clients, the rounds and the algorithm. Bundled ones load by name: "
            "`digits`, `sensors`, `cifar10-homo`, ... (see "
            "[Prototypes and configurations](../concepts/prototypes.md)).",
        ),
        "reference/device-profile.md": config_page(
            "Device profile",
            DeviceProfile,
            intro="A device profile (`profiles/devices/*.yaml`, or any YAML file given by "
            "path to `--profile`) says what one kind of device trains, runs and sends, and "
            "within which limits. `takfl-agent profiles` lists the bundled ones and "
            "`takfl-agent validate FILE` checks a file.",
        ),
    }


def systemd_page() -> str:
    """The agent's systemd unit as a page: a short introduction and the file itself."""
    unit = (REPO / SYSTEMD_UNIT).read_text(encoding="utf-8")
    return (
        "# systemd unit for the agent\n\n"
        f"`{SYSTEMD_UNIT}` runs `takfl-agent run` as a service on a board (see "
        "[Raspberry Pi](raspberry-pi.md) for where it goes and how to enable it). "
        "Edit `--broker` and the profile before installing it.\n\n"
        f"```ini\n{unit.rstrip()}\n```\n"
    )


def generated_pages() -> dict[str, str]:
    """Every page this hook makes: site path -> Markdown."""
    return {**cli_pages(), **config_reference_pages(), SYSTEMD_PAGE: systemd_page()}


def mirrored_files() -> dict[str, Path]:
    """Site path -> repository file served as it is (pages and plots)."""
    files = {site: REPO / repo for site, repo in MIRRORED_PAGES.items()}
    for png in sorted((REPO / PLOTS_DIR).glob("*.png")):
        files[f"{PLOTS_SITE_DIR}/{png.name}"] = png
    return files


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """MkDocs event: add the generated and mirrored files to the build."""
    from mkdocs.structure.files import File

    for path, content in generated_pages().items():
        files.append(File.generated(config, path, content=content))
    for path, source in mirrored_files().items():
        files.append(File.generated(config, path, abs_src_path=str(source)))
    return files
