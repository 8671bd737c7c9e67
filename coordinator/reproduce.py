"""``takfl-coordinator reproduce``: the paper's comparison on its settings, our figures
beside the paper's (read from a data file that names its source)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict

from coordinator.simulate import SimulationSpec, run_simulation
from takfl.algorithms import resolve_algorithm
from takfl.config import FederationConfig

PAPER_TABLE = Path(__file__).resolve().parents[1] / "profiles" / "paper" / "takfl-table.yaml"


class PaperTable(BaseModel):
    """setting -> algorithm -> tier -> reported accuracy (%), None where not transcribed."""

    model_config = ConfigDict(extra="forbid")
    source: str
    table: str | None = None
    settings: dict[str, dict[str, dict[str, float | None]]]

    def value(self, setting: str, algorithm: str, tier: str) -> float | None:
        return self.settings.get(setting, {}).get(algorithm, {}).get(tier)


def load_paper_table(path: Path | None = None) -> PaperTable:
    p = path or _bundled_table()
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read the paper's table {p}: {e}") from e
    return PaperTable.model_validate(data)


def _bundled_table() -> Path:
    try:
        import profiles

        return Path(profiles.__file__).resolve().parent / "paper" / "takfl-table.yaml"
    except ImportError:  # pragma: no cover - source tree without install
        return PAPER_TABLE


def run_setting(
    cfg: FederationConfig,
    *,
    algorithms: list[str],
    seeds: int,
    rounds: int | None,
    data_dir: str | None,
    out: Path,
    device: torch.device,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Every algorithm on the setting's identical partitions; results as ``simulate``'s."""
    resolved = [resolve_algorithm(cfg.algorithm, a) for a in algorithms]
    spec = SimulationSpec(algorithms=resolved, seeds=seeds, rounds=rounds, data_dir=data_dir)
    return run_simulation(cfg, spec, out, device)


def comparison_rows(
    setting: str,
    tiers: list[str],
    ours: dict[str, dict[str, dict[str, Any]]],
    paper: PaperTable,
) -> list[list[str]]:
    """One row per algorithm: each tier and the mean as "ours (paper)"."""

    def cell(mine: float, theirs: float | None) -> str:
        return f"{mine:.2f} ({'n/a' if theirs is None else f'{theirs:.2f}'})"

    rows = []
    for alg, by_tier in ours.items():
        cells = [cell(by_tier[t]["mean"], paper.value(setting, alg, t)) for t in tiers]
        mine = sum(by_tier[t]["mean"] for t in tiers) / len(tiers)
        theirs_all = [paper.value(setting, alg, t) for t in tiers]
        theirs = (
            None
            if any(v is None for v in theirs_all)
            else sum(v for v in theirs_all if v is not None) / len(tiers)
        )
        rows.append([alg, *cells, cell(mine, theirs)])
    return rows
