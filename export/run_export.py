"""Export every prototype of a coordinator run: what the coordinator calls at the end.

Reads the run store (``config.yaml``, ``models/<prototype>/round-<r>.safetensors``),
takes each prototype's latest checkpoint and exports it in the format and
quantisation its device profile asks for (``inference.format`` /
``inference.quantization``) plus the float artifact, into
``exports/<prototype>/``. A prototype that cannot be exported is recorded with
its reason; the others go ahead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.common import REPORT_FILE, TORCH_RUNTIME, ExportError
from export.data import eval_data
from export.formats import FLOAT, FormatUnit, profile_format
from export.pipeline import ExportOptions, export_checkpoint
from export.report import ExportReport, write_json
from export.source import prototype_profile
from takfl.checkpoint import CheckpointError
from takfl.config import ConfigError, DeviceProfile, load_federation
from takfl.data import DataError
from takfl.run_layout import CONFIG_FILE as RUN_CONFIG
from takfl.run_layout import EXPORTS_DIR, RunLayoutError, read_run_state
from takfl.run_layout import latest_checkpoint as layout_latest_checkpoint


@dataclass(kw_only=True)
class RunExport:
    """Reports of every prototype exported from one run, and the prototypes that failed."""

    run_dir: str
    state_round: int | None  # the round state.json records, if readable
    reports: list[ExportReport] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # prototype -> why not exported

    @property
    def ok(self) -> bool:
        return not self.errors and all(r.ok for r in self.reports)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": self.run_dir,
            "state_round": self.state_round,
            "ok": self.ok,
            "errors": dict(self.errors),
            "prototypes": [r.to_dict() for r in self.reports],
        }


def latest_checkpoint(run_dir: str | Path, prototype: str) -> Path:
    """The highest-numbered ``round-<r>.safetensors`` of a prototype in the run store;
    :class:`CheckpointError` when it has none."""
    try:
        return layout_latest_checkpoint(run_dir, prototype)
    except RunLayoutError as e:
        raise CheckpointError(str(e)) from e


def profile_request(profile: DeviceProfile) -> tuple[list[FormatUnit], list[str], str]:
    """(format units, quantisations, note) a device profile asks for; the float model always.

    A profile that runs PyTorch directly gets the portable float ONNX artifact.
    """
    fmt, quant = profile.inference.format, str(profile.inference.quantization)
    unit, note = profile_format(fmt), ""
    if fmt == TORCH_RUNTIME:
        note = f"profile {profile.name} runs PyTorch; exported float {unit.name.upper()} only"
        quant = FLOAT
    return [unit], [FLOAT] if quant == FLOAT else [FLOAT, quant], note


def _state_round(run: Path) -> int | None:
    try:
        return read_run_state(run)["round"]
    except (OSError, RunLayoutError):
        return None


def export_run(
    run_dir: str | Path,
    *,
    threads: int | None = None,
    latency_iters: int = 100,
    prototypes: list[str] | None = None,
) -> RunExport:
    """Export the latest checkpoint of every prototype (or of ``prototypes``) of a run.

    Args:
        threads: runtime threads for measurements; each profile's own when None
            (capped at this machine's cores).
    Returns:
        the reports; also written to ``<run>/exports/<prototype>/report.json`` and,
        all together, ``<run>/exports/report.json``.
    Raises:
        ExportError / ConfigError: the run directory has no loadable config.
    """
    run = Path(run_dir)
    cfg_path = run / RUN_CONFIG
    if not cfg_path.is_file():
        raise ExportError(f"{run} is not a run directory: {RUN_CONFIG} is missing")
    cfg = load_federation(cfg_path)
    known = [p.name for p in cfg.prototypes]
    wanted = prototypes or known
    unknown = [p for p in wanted if p not in known]
    if unknown:
        raise ExportError(f"unknown prototype {', '.join(unknown)}; the run has {', '.join(known)}")
    data = eval_data(cfg)
    result = RunExport(run_dir=str(run), state_round=_state_round(run))
    for name in wanted:
        try:
            profile = prototype_profile(cfg, name, cfg_path)
            formats, quants, note = profile_request(profile)
            options = ExportOptions(
                formats=formats, quantizations=quants, threads=threads, latency_iters=latency_iters
            )
            report = export_checkpoint(
                latest_checkpoint(run, name),
                cfg_path,
                run / EXPORTS_DIR / name,
                prototype=name,
                options=options,
                data=data,
            )
        except (CheckpointError, ExportError, ConfigError, DataError) as e:
            result.errors[name] = str(e)
            continue
        if note:
            report.notes.append(note)
        report.notes.append(
            f"profile {profile.name}: {profile.inference.runtime}, "
            f"{profile.inference.format}, {profile.inference.quantization}"
        )
        write_json(Path(report.out_dir) / REPORT_FILE, report.to_dict())
        result.reports.append(report)
    write_json(run / EXPORTS_DIR / REPORT_FILE, result.to_dict())
    return result
