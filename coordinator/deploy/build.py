"""Releases from a run: each prototype's verified export of a round, in the format,
quantisation and runtime its device profile asks for, with reference outputs, signed.

For every prototype asked for:

1. the **target**: the profile's ``inference`` runtime, format and quantisation (a
   profile that runs PyTorch directly is refused: releases carry exported artifacts);
2. the **export** of round R (default: the run's last completed round) under
   ``RUN/exports/<prototype>/``: its artifact must match its sidecar, and the export
   report's row for that artifact in the release runtime must be ``OK`` (an export
   whose verification failed is refused). When the export is missing, it is made, as
   ``takfl-export`` makes it (``export.run_export.export_run`` for the latest
   checkpoint, one call for every prototype that needs it; ``export_checkpoint`` for
   an earlier round);
3. the **reference**: 8 public samples (normalised as the model takes them) and the
   artifact's own outputs on them, in the release runtime on this machine, with the
   tolerance :func:`takfl.release.reference.default_tolerance` gives;
4. the next **version** of the prototype, signed and stored
   (:func:`coordinator.deploy.publish.publish`).

Needs the export toolchain (``takfl-edge[export]``), imported when used.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.deploy.publish import Published, ReleaseBuildError, Signing, publish
from coordinator.deploy.store import ReleaseStore
from coordinator.store import RunStore
from takfl.config import FederationConfig, load_federation, prototype_profile
from takfl.config.profile import HardwareClass
from takfl.release.metadata import ReleaseSpec
from takfl.release.reference import default_tolerance, encode_reference

REFERENCE_SAMPLES = 8  # public inputs whose outputs a device must reproduce
TORCH = "torch"
VERIFIED = "OK"  # the export report's status of an artifact that verified


@dataclass(frozen=True, kw_only=True)
class Target:
    """What a prototype's devices run, from its device profile."""

    prototype: str
    profile: str
    hardware_class: HardwareClass
    runtime: str
    format: str
    quantization: str
    chunk_size: int  # bytes per chunk on the wire (the profile's comms)


def release_target(cfg: FederationConfig, prototype: str) -> Target:
    """The release target of ``prototype``; :class:`ReleaseBuildError` for a profile
    that runs PyTorch directly (there is no artifact to release to it)."""
    profile = prototype_profile(cfg, prototype)
    inference = profile.inference
    if TORCH in (inference.format, inference.runtime):
        raise ReleaseBuildError(
            f"profile {profile.name} of prototype {prototype} runs PyTorch directly; releases "
            "carry exported artifacts: give it an onnx or tflite inference format"
        )
    return Target(
        prototype=prototype,
        profile=profile.name,
        hardware_class=profile.hardware_class,
        runtime=inference.runtime,
        format=inference.format,
        quantization=inference.quantization,
        chunk_size=profile.comms.chunk_size_kib * 1024,
    )


def _artifact_path(run: Path, target: Target, round_: int) -> Path:
    from export.formats import artifact_filename

    name = artifact_filename(target.prototype, round_, target.format, target.quantization)
    return RunStore(run).exports_dir / target.prototype / name


def verified_artifact(run: Path, target: Target, round_: int) -> Path | None:
    """The exported artifact of ``target`` for round ``round_`` if its export verified
    it in the release runtime; None when there is no such export (yet).

    Raises:
        ReleaseBuildError: the export exists and its verification failed, or could not
            run in the release runtime on this machine.
    """
    from export.common import REPORT_FILE

    path = _artifact_path(run, target, round_)
    report_path = path.parent / REPORT_FILE
    if not path.is_file() or not report_path.is_file():
        return None
    report: dict[str, Any] = json.loads(report_path.read_text())
    if report.get("round") != round_:
        return None  # the folder's report describes another round's export
    rows = [
        r
        for r in report.get("rows", [])
        if (r.get("format"), r.get("quantization"), r.get("runtime"))
        == (target.format, target.quantization, target.runtime)
        and Path(str(r.get("artifact"))).name == path.name
    ]
    if not rows:
        return None
    row = rows[0]
    if row.get("status") != VERIFIED:
        raise ReleaseBuildError(
            f"the export of {path.name} did not verify in {target.runtime} "
            f"({row.get('status')}: {row.get('reason') or 'see its report'}); "
            f"{report_path} has the details, and a release is made only of a verified export"
        )
    return path


def _latest_round(run: Path, prototype: str) -> int | None:
    from export.run_export import latest_checkpoint
    from takfl.checkpoint import CheckpointError

    try:
        name = latest_checkpoint(run, prototype).name
    except CheckpointError:
        return None
    return int(name.removeprefix("round-").split(".")[0])


def export_missing(
    run: Path,
    targets: Mapping[str, Target],
    round_: int,
    report: Callable[[str], None],
) -> dict[str, Path]:
    """prototype -> verified artifact of round ``round_``, exporting those missing."""
    from export.common import ExportError
    from export.pipeline import ExportOptions, export_checkpoint
    from export.run_export import export_run, profile_request

    found = {p: verified_artifact(run, t, round_) for p, t in targets.items()}
    missing = [p for p, a in found.items() if a is None]
    latest = [p for p in missing if _latest_round(run, p) == round_]
    errors: dict[str, str] = {}
    if latest:
        report(f"exporting round {round_} of {', '.join(latest)} (takfl-export --run)...")
        errors |= export_run(run, prototypes=latest).errors
    store = RunStore(run)
    cfg = load_federation(store.config_path)
    for p in [p for p in missing if p not in latest]:
        checkpoint = store.model_path(p, round_)
        if not checkpoint.is_file():
            errors[p] = f"no checkpoint {checkpoint}"
            continue
        report(f"exporting round {round_} of {p} ({checkpoint.name})...")
        formats, quants, _ = profile_request(prototype_profile(cfg, p))
        options = ExportOptions(formats=formats, quantizations=quants)
        try:
            export_checkpoint(
                checkpoint, store.config_path, store.exports_dir / p, prototype=p, options=options
            )
        except ExportError as e:
            errors[p] = str(e)
    for p in missing:
        found[p] = verified_artifact(run, targets[p], round_)
        if found[p] is None:
            t = targets[p]
            why = errors.get(p, f"it wrote no verified {t.format}/{t.quantization} artifact")
            raise ReleaseBuildError(f"cannot export round {round_} of {p}: {why}")
    return {p: a for p, a in found.items() if a is not None}


def reference_pair(cfg: FederationConfig, artifact: Path, runtime: str) -> tuple[Any, Any]:
    """(inputs (N, C, H, W), outputs (N, K)): public samples, already normalised, and
    the artifact's outputs on them in ``runtime``."""
    from export.data import eval_data
    from export.runtimes import load_artifact

    data = eval_data(cfg, calibration_samples=REFERENCE_SAMPLES, test_samples=1)
    inputs = data.calibration[:REFERENCE_SAMPLES].numpy()
    outputs = load_artifact(artifact, runtime=runtime, threads=1).run(inputs)
    return inputs, outputs


def checked_artifact(target: Target, artifact: Path, round_: int) -> Any:
    """The artifact's metadata (``export.metadata.ArtifactMetadata``), once its sidecar
    vouches for it (SHA-256, size, embedded metadata) and it is the target's artifact of
    round ``round_``."""
    from export.common import ArtifactError
    from export.metadata import verify_sidecar

    try:
        meta = verify_sidecar(artifact)
    except ArtifactError as e:
        raise ReleaseBuildError(f"refusing to release {artifact.name}: {e}") from e
    found = (meta.prototype, meta.round, meta.format, meta.quantization)
    wanted = (target.prototype, round_, target.format, target.quantization)
    if found != wanted:
        raise ReleaseBuildError(f"{artifact} is {found}, expected {wanted}")
    return meta


def release_spec(fleet: str, target: Target, meta: Any, outputs: Any) -> ReleaseSpec:
    """The spec of a release of the artifact described by ``meta`` whose reference
    outputs are ``outputs``."""
    tolerance, min_top1 = default_tolerance(target.quantization, outputs)
    return ReleaseSpec(
        fleet=fleet,
        prototype=target.prototype,
        round=meta.round,
        runtime=target.runtime,
        format=target.format,
        quantization=target.quantization,
        builder=meta.builder,
        num_classes=meta.num_classes,
        input_shape=meta.input_shape,
        mean=list(meta.mean),
        std=list(meta.std),
        class_names=list(meta.class_names),
        tolerance=tolerance,
        min_top1=min_top1,
    )


def run_round(run: Path, round_: int | None) -> int:
    """``round_``, or the run's last completed round."""
    if round_ is not None:
        return round_
    return int(RunStore(run).read_state()["round"])


def releases_from_run(
    run_dir: str | Path,
    prototypes: Sequence[str],
    signing: Signing,
    *,
    round_: int | None = None,
    report: Callable[[str], None] = print,
) -> dict[str, Published]:
    """A new signed release of every prototype in ``prototypes`` (see the module
    docstring), stored in ``RUN/releases``; prototype -> what was published.

    Raises:
        ReleaseBuildError: an unknown prototype, a refused or failed export.
        RunStoreError / ConfigError: not a run directory.
    """
    run = Path(run_dir)
    cfg = load_federation(RunStore(run).config_path)
    known = [p.name for p in cfg.prototypes]
    unknown = [p for p in prototypes if p not in known]
    if unknown or not prototypes:
        raise ReleaseBuildError(
            f"unknown prototype {', '.join(unknown) or '(none given)'}; the run has "
            f"{', '.join(known)}"
        )
    r = run_round(run, round_)
    targets = {p: release_target(cfg, p) for p in prototypes}
    artifacts = export_missing(run, targets, r, report)
    store = ReleaseStore(run)
    out = {}
    for p, target in targets.items():
        meta = checked_artifact(target, artifacts[p], r)
        inputs, outputs = reference_pair(cfg, artifacts[p], target.runtime)
        spec = release_spec(signing.fleet, target, meta, outputs)
        out[p] = publish(
            store,
            signing,
            spec=spec,
            model=artifacts[p].read_bytes(),
            model_name=artifacts[p].name,
            reference=encode_reference(inputs, outputs),
            chunk_size=target.chunk_size,
        )
        report(
            f"release {out[p].version} of {p}: round {r}, {target.format}/"
            f"{target.quantization} for {target.runtime}, {out[p].size / 1024:.0f} KiB, "
            f"tolerance {spec.tolerance:.3g}"
        )
    return out
