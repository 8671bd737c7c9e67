"""``takfl-agent``: the command line of the edge agent.

Each subcommand is a small function that parses its options, calls library code and
prints the result with ``rich``. A subcommand that needs more than a few lines lives in
its own module as a plain function and is registered at the bottom of this file with
``app.command("name")(function)``, so this module stays the single entry point.

Exit codes: 0 success, 2 invalid configuration (every problem is printed, no traceback).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from takfl.config import ConfigError, DeviceProfile, ModelSpec, bundled_names, load_profile

EXIT_CONFIG = 2  # the configuration file is missing or invalid

app = typer.Typer(
    name="takfl-agent",
    help="Edge agent of a takfl-edge federation: device profiles, local training, inference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold secrets
)


def out_console() -> Console:
    """Console on stdout, made per call so that COLUMNS, NO_COLOR and redirections apply."""
    return Console()


def err_console() -> Console:
    """Console on stderr, for problems and errors."""
    return Console(stderr=True)


# --- pure formatting helpers -------------------------------------------------------------


def model_cell(spec: ModelSpec) -> str:
    """``resnet14`` or ``mobilenetv2 width_mult=0.5``: the builder and its arguments."""
    args = " ".join(f"{k}={v}" for k, v in sorted(spec.args.items()))
    return f"{spec.builder} {args}" if args else spec.builder


def training_cell(profile: DeviceProfile) -> str:
    """Local training as ``epochs/batch/threads``, e.g. ``2/64/8``."""
    t = profile.training
    return f"{t.epochs}/{t.batch_size}/{t.threads}"


def inference_cell(profile: DeviceProfile) -> str:
    """Inference as ``runtime format quantisation``, e.g. ``ai-edge-litert tflite int8``."""
    i = profile.inference
    return f"{i.runtime} {i.format} {i.quantization}"


def profiles_table(profiles: list[DeviceProfile]) -> Table:
    """One row per profile: name, prototype, hardware class, model, training, inference,
    update compression."""
    table = Table(
        title="Bundled device profiles",
        caption="train: local epochs/batch size/threads; update: compression of sent deltas",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("profile", no_wrap=True, style="bold")
    table.add_column("proto", justify="center", no_wrap=True)
    table.add_column("hardware", overflow="fold")
    table.add_column("model", overflow="fold")
    table.add_column("train", justify="right", no_wrap=True)
    table.add_column("inference", overflow="fold")
    table.add_column("update", no_wrap=True)
    for p in profiles:
        table.add_row(
            p.name,
            p.prototype,
            p.hardware_class,
            model_cell(p.model),
            training_cell(p),
            inference_cell(p),
            p.comms.compression,
        )
    return table


def profile_summary(profile: DeviceProfile) -> list[str]:
    """Lines describing a loaded profile (what ``validate`` prints on success)."""
    t, c = profile.training, profile.comms
    limits = []
    if t.memory_limit_mb is not None:
        limits.append(f"memory {t.memory_limit_mb} MB")
    if t.time_budget_s is not None:
        limits.append(f"time budget {t.time_budget_s:g} s")
    return [
        f"name        {profile.name} (prototype {profile.prototype}, {profile.hardware_class})",
        f"model       {model_cell(profile.model)}",
        f"training    {t.epochs} epoch(s), batch {t.batch_size}, {t.optimizer} "
        f"lr {t.learning_rate:g}, {t.threads} thread(s)"
        + (f"; {', '.join(limits)}" if limits else ""),
        f"inference   {inference_cell(profile)}, {profile.inference.threads} thread(s)",
        f"comms       {c.compression} updates, {c.chunk_size_kib} KiB chunks, QoS {c.qos}",
    ]


def print_config_error(err: ConfigError, what: str) -> None:
    """Every problem of ``err`` on stderr, one ``field.path: message`` line each, in red."""
    n = len(err.problems)
    console = err_console()
    console.print(
        Text(f"{err.source} is not a valid {what} ({n} problem(s)):", style="bold red"),
        soft_wrap=True,
    )
    for problem in err.problems:
        console.print(Text(f"  {problem}", style="red"), soft_wrap=True)


# --- commands ----------------------------------------------------------------------------


def _version_callback(value: bool) -> None:
    if value:
        try:
            out_console().print(f"takfl-agent {version('takfl-edge')}")
        except PackageNotFoundError:  # running from a source tree that is not installed
            out_console().print("takfl-agent (not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """Edge agent of a takfl-edge federation."""


@app.command()
def profiles() -> None:
    """List the bundled device profiles."""
    try:
        loaded = [load_profile(name) for name in bundled_names("devices")]
    except ConfigError as e:  # a bundled file edited in place
        print_config_error(e, "device profile")
        raise typer.Exit(EXIT_CONFIG) from None
    out_console().print(profiles_table(loaded))


@app.command()
def validate(
    profile: str = typer.Argument(
        ..., metavar="PATH_OR_NAME", help="A device profile YAML file or a bundled name."
    ),
) -> None:
    """Check a device profile; list every problem, field by field."""
    try:
        loaded = load_profile(profile)
    except ConfigError as e:
        print_config_error(e, "device profile")
        raise typer.Exit(EXIT_CONFIG) from None
    console = out_console()
    console.print(Text(f"{profile}: valid device profile", style="bold green"), soft_wrap=True)
    for line in profile_summary(loaded):
        console.print(Text(f"  {line}"), soft_wrap=True)


# --- subcommands defined in their own modules --------------------------------------------
# Register them here, e.g. ``app.command("run")(run_agent.run)``.
from edge_agent import doctor_command, predict_command, run_command, serve_command  # noqa: E402

app.command("run")(run_command.run)
app.command("predict")(predict_command.predict)
app.command("doctor")(doctor_command.doctor)
app.command("serve")(serve_command.serve)


def main() -> None:
    """Console-script entry point (``takfl-agent``)."""
    app()


if __name__ == "__main__":
    main()
