"""``takfl-agent predict``: run an exported model through the device profile's runtime."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from takfl.config import ConfigError, load_profile

if TYPE_CHECKING:
    import numpy as np
    from tuf.api.metadata import Root

    from export.formats import FormatUnit

console = Console()
_ROUND = re.compile(r"-round-(\d+)-")


def pick_artifact(model: Path, fmt: str | FormatUnit, quantization: str) -> Path:
    """``model`` itself if a file; in a folder (e.g. RUN/exports/<P>/) the newest round's
    artifact of the format (a unit or its name) and quantisation (``none`` means fp32)."""
    from export.common import QUANT_TAGS
    from export.formats import resolve_format

    if model.is_file():
        return model
    if not model.is_dir():
        raise FileNotFoundError(f"no model file or export folder at {model}")
    unit = resolve_format(fmt)
    found = [p for p in model.glob(unit.artifact_glob(quantization))]
    if not found:
        raise FileNotFoundError(
            f"{model} holds no {QUANT_TAGS[quantization]} {unit.suffix} artifact; export one "
            f"with takfl-export, or pass the file itself"
        )

    def round_of(p: Path) -> int:
        m = _ROUND.search(p.name)
        return int(m.group(1)) if m else -1

    return max(found, key=round_of)


def load_inputs(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (N, C, H, W) scaled as the training loader scales them, and labels if present.

    ``.npz`` with ``x`` (and optional ``y``), or ``digits`` for scikit-learn's bundled digits.
    """
    import numpy as np  # here, so that the CLI's other commands start without it

    if str(path) == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.images / 16.0).astype(np.float32)[:, None], d.target
    if path.suffix != ".npz" or not path.is_file():
        raise FileNotFoundError(f"--input {path}: expected a .npz file with 'x' (and 'y')")
    with np.load(path, allow_pickle=False) as f:
        x = np.asarray(f["x"], dtype=np.float32)
        y = np.asarray(f["y"]) if "y" in f else None
    return (x[:, None] if x.ndim == 3 else x), y


def predict(
    profile: str = typer.Option(..., help="Device profile: picks runtime, format, threads."),
    model: Path = typer.Option(..., help="An .onnx/.tflite file or an export folder."),
    inputs: Path = typer.Option(..., "--input", help="A .npz with x (and y), or 'digits'."),
    runtime: str = typer.Option(None, help="Override the profile's runtime."),
    show: int = typer.Option(10, min=0, help="Predictions to print."),
    release_root: Path = typer.Option(
        None,
        help="The fleet's root.json (from provision; the demo's is RUN/root.json): the "
        "sidecar must be signed by the fleet's release key it names.",
    ),
    allow_unverified: bool = typer.Option(
        False,
        "--allow-unverified",
        help="Run a model without a matching, signed sidecar (.json with its SHA-256). Unsafe.",
    ),
) -> None:
    """Classify inputs with the exported model, as the device would. The model must match
    its sidecar (SHA-256, size, metadata), and the sidecar must be signed with the fleet's
    release key (checked against --release-root), unless --allow-unverified is given."""
    from export.common import TORCH_RUNTIME
    from export.formats import profile_format
    from export.metadata import verify_sidecar
    from export.runtimes import ArtifactError, load_artifact, softmax

    try:
        prof = load_profile(profile)
        inf = prof.inference
        path = pick_artifact(model, profile_format(inf.format), inf.quantization)
        if allow_unverified:
            console.print(f"[yellow]warning:[/yellow] running {path.name} without verifying it")
        else:
            verify_sidecar(path, trusted_root(release_root))
        runner = load_artifact(
            path,
            runtime=runtime or (None if inf.runtime == TORCH_RUNTIME else inf.runtime),
            threads=inf.threads,
            check_digest=not allow_unverified,
        )
        x, y = load_inputs(inputs)
    except (ConfigError, ArtifactError, FileNotFoundError, KeyError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    meta = runner.metadata
    if meta is not None:
        x = meta.normalise(x)
    logits = runner.run(x)
    probs = softmax(logits)
    names = meta.class_names if meta is not None and meta.class_names else None
    table = Table(
        title=f"{path.name} on {getattr(runner, 'runtime', inf.runtime)} ({inf.threads} threads)"
    )
    for col in ("#", "prediction", "confidence", "label"):
        table.add_column(col)
    for i in range(min(show, len(x))):
        k = int(probs[i].argmax())
        label = "" if y is None else str(names[int(y[i])] if names else int(y[i]))
        table.add_row(str(i), names[k] if names else str(k), f"{probs[i, k]:.3f}", label)
    console.print(table)
    if y is not None:
        acc = float((probs.argmax(1) == y).mean()) * 100
        console.print(f"accuracy on {len(x)} labelled inputs: {acc:.2f}%")


def trusted_root(path: Path | None) -> Root:
    """The fleet's root metadata that vouches for signed sidecars.

    Raises:
        ValueError: none given (``ReleaseKeyError`` for an unreadable one).
    """
    from takfl.release.keys import load_root

    if path is None:
        raise ValueError(
            "give --release-root (the fleet's root.json: provision writes it beside agents.json, "
            "the demo into its run directory) to check the export's signature, or "
            "--allow-unverified to run it unchecked"
        )
    return load_root(path)
