"""``takfl-export``: checkpoints to verified ONNX / TFLite / ExecuTorch artifacts.

    takfl-export --checkpoint M.safetensors --config digits --prototype M \\
                 --formats onnx,tflite --quantize none,int8 --out exports/M
    takfl-export --run runs/demo
    takfl-export --checkpoint S.safetensors --config digits --prototype S --executorch

Exit status: 0 every artifact verified; 1 an artifact FAILED or did not match
PyTorch; 2 bad input (checkpoint, config, prototype, format), nothing exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from export.common import QUANTIZATIONS, REPORT_FILE, ExportError, parse_choices
from export.formats import DEFAULT_FORMATS, format_names, resolve_formats

if TYPE_CHECKING:
    from securesystemslib.signer import Signer

app = typer.Typer(
    add_completion=False,
    help="Export prototype checkpoints to ONNX and TFLite, "
    "quantise them, and verify every artifact against PyTorch.",
)
err = Console(stderr=True)

EXIT_OK, EXIT_FAILED_ROWS, EXIT_BAD_INPUT = 0, 1, 2


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(EXIT_BAD_INPUT)


def _input_errors() -> tuple[type[Exception], ...]:
    from takfl.checkpoint import CheckpointError
    from takfl.config import ConfigError
    from takfl.data import DataError
    from takfl.release.keys import ReleaseKeyError

    return CheckpointError, ConfigError, DataError, ExportError, ReleaseKeyError


@app.command()
def export(
    checkpoint: Path = typer.Option(None, help="Prototype checkpoint (.safetensors)."),
    config: str = typer.Option(None, help="Federation config: bundled name or YAML path."),
    prototype: str = typer.Option(None, help="Prototype of the checkpoint (default: its own)."),
    formats: str = typer.Option(
        ",".join(DEFAULT_FORMATS),
        "--formats",
        "--format",
        help=f"Comma list of {', '.join(format_names())}.",
    ),
    quantize: str = typer.Option(
        "none",
        help=f"Comma list of {', '.join(QUANTIZATIONS)} (the float model is always exported).",
    ),
    out: Path = typer.Option(None, help="Output folder (default: exports/<prototype>)."),
    run: Path = typer.Option(
        None,
        help="Run directory: export every prototype's latest "
        "checkpoint as its device profile asks, into RUN/exports/.",
    ),
    threads: int = typer.Option(
        None,
        min=1,
        help="Runtime threads for measurements "
        "(default: the prototype's profile, capped at the cores here).",
    ),
    latency_iters: int = typer.Option(100, min=1, help="Timed single-sample runs per runtime."),
    slim: bool = typer.Option(True, help="Slim ONNX graphs with onnxslim when installed."),
    executorch: bool = typer.Option(
        False,
        "--executorch",
        help="Instead of --formats: the ExecuTorch training program (forward, loss, backward) "
        "and XNNPACK inference program for phones, each checked against PyTorch.",
    ),
    sign_with: Path = typer.Option(
        None,
        help="The fleet's release key (release-key.pem from provision): sign every sidecar, "
        "so devices can check them against root.json (default with --run: RUN/release-key.pem "
        "when there is one).",
    ),
) -> None:
    """Export, quantise and verify; print one table and write report.json."""
    from export.report import print_reports

    if (checkpoint is None) == (run is None):
        raise _fail("give either --checkpoint (with --config) or --run")
    try:
        signer = _signer(sign_with, run)
        if run is not None:
            from export.run_export import EXPORTS_DIR, export_run

            result = export_run(run, threads=threads, latency_iters=latency_iters)
            _sign(Path(run) / EXPORTS_DIR, signer)
            print_reports(result.reports, f"Exports of {run}")
            for name, why in result.errors.items():
                err.print(f"[red]{name}: not exported:[/red] {why}", highlight=False)
            err.print(f"report: {Path(run) / EXPORTS_DIR / REPORT_FILE}", highlight=False)
            if result.errors:
                raise typer.Exit(EXIT_BAD_INPUT)
            raise typer.Exit(EXIT_OK if result.ok else EXIT_FAILED_ROWS)
        if config is None:
            raise _fail("--checkpoint needs --config (bundled federation name or YAML path)")
        if executorch:
            _export_executorch(checkpoint, config, out, prototype, signer)
        from export.pipeline import ExportOptions, export_checkpoint

        options = ExportOptions(
            formats=resolve_formats(formats),
            quantizations=parse_choices(quantize, QUANTIZATIONS, "quantization"),
            threads=threads,
            latency_iters=latency_iters,
            slim=slim,
        )
        report = export_checkpoint(checkpoint, config, out, prototype=prototype, options=options)
    except _input_errors() as e:
        raise _fail(str(e)) from None
    _sign(Path(report.out_dir), signer)
    print_reports([report], f"Export of {checkpoint}")
    err.print(f"report: {Path(report.out_dir) / REPORT_FILE}", highlight=False)
    raise typer.Exit(EXIT_OK if report.ok else EXIT_FAILED_ROWS)


def _signer(key: Path | None, run: Path | None) -> Signer | None:
    """The release key to sign sidecars with: ``key``, else the run's own (the demo keeps
    one in its run directory), else None (sidecars stay unsigned, and say so)."""
    from takfl.release.keys import KEY_FILE, load_signer

    if key is None and run is not None and (Path(run) / KEY_FILE).is_file():
        key = Path(run) / KEY_FILE
    return None if key is None else load_signer(key)


def _sign(folder: Path, signer: Signer | None) -> None:
    """Sign every sidecar under ``folder``, or say that they stay unsigned."""
    from export.metadata import sign_sidecars

    if signer is None:
        err.print(
            "sidecars not signed (no release key: --sign-with PROVISION/release-key.pem); "
            "devices will need --allow-unverified to run them",
            highlight=False,
        )
        return
    signed = sign_sidecars(folder, signer)
    err.print(f"signed {len(signed)} sidecar(s) with the fleet's release key", highlight=False)


def _export_executorch(
    checkpoint: Path,
    config: str,
    out: Path | None,
    prototype: str | None,
    signer: Signer | None,
) -> None:
    from export.executorch_export import ProgramExportError, ProgramParityError
    from export.pipeline import export_programs
    from takfl.ondevice import ExecuTorchMissing

    try:
        programs = export_programs(checkpoint, config, out, prototype=prototype)
    except ExecuTorchMissing as e:
        raise _fail(str(e)) from None
    except (ProgramExportError, ProgramParityError) as e:
        err.print(f"[red]FAILED:[/red] {e}", highlight=False)
        raise typer.Exit(EXIT_FAILED_ROWS) from None
    for unit, built in programs:
        print(f"{unit.title:<17} {built.path}  ({built.path.stat().st_size / 1024:.0f} KiB)")
        print(f"  {built.check}")
    if programs:
        _sign(programs[0][1].path.parent, signer)
    raise typer.Exit(EXIT_OK)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
