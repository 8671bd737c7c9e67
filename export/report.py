"""The export report: one table per run of the exporter, printed and written as JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.common import QUANT_TAGS, TORCH_RUNTIME
from export.verify import FAILED, MISMATCH, SKIPPED, VerifyRow
from takfl.files import atomic_write_text

_PROBLEMS = (FAILED, MISMATCH)


@dataclass(kw_only=True)
class ExportReport:
    """Everything exported for one prototype checkpoint, and how each artifact verified."""

    prototype: str
    round: int
    builder: str
    out_dir: str
    threads: int
    data: str  # where the calibration and test inputs came from
    checkpoint: str | None = None
    rows: list[VerifyRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No row FAILED or MISMATCH (SKIPPED rows are runtimes not installed here)."""
        return not any(r.status in _PROBLEMS for r in self.rows)

    def artifacts(self) -> dict[str, str]:
        """``{"onnx/int8": path, ...}`` of every artifact that exists."""
        out: dict[str, str] = {}
        for r in self.rows:
            if r.artifact and r.format != TORCH_RUNTIME:
                out.setdefault(f"{r.format}/{r.quantization}", r.artifact)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "prototype": self.prototype,
            "round": self.round,
            "builder": self.builder,
            "checkpoint": self.checkpoint,
            "out_dir": self.out_dir,
            "threads": self.threads,
            "data": self.data,
            "ok": self.ok,
            "notes": list(self.notes),
            "artifacts": self.artifacts(),
            "rows": [r.to_dict() for r in self.rows],
        }


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _status(status: str) -> str:
    colour = {FAILED: "red", MISMATCH: "yellow", SKIPPED: "dim"}.get(status, "green")
    return f"[{colour}]{status}[/{colour}]"


def render_table(reports: Sequence[ExportReport], title: str = "Export verification") -> Any:
    """A rich Table: one row per artifact and runtime, PyTorch eager first per prototype."""
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for name, justify in [
        ("proto", "left"),
        ("round", "right"),
        ("format", "left"),
        ("quant", "left"),
        ("runtime", "left"),
        ("status", "left"),
        ("size MB", "right"),
        ("acc %", "right"),
        ("agree %", "right"),
        ("max|diff|", "right"),
        ("p50 ms", "right"),
        ("p90 ms", "right"),
        ("thr", "right"),
        ("note", "left"),
    ]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for rep in reports:
        for r in rep.rows:
            table.add_row(
                rep.prototype,
                str(rep.round),
                r.format,
                QUANT_TAGS.get(r.quantization, "?"),
                r.runtime,
                _status(r.status),
                _num(r.size_mb, ".3f"),
                _num(r.accuracy, ".2f"),
                _num(r.agreement, ".1f"),
                _num(r.max_abs_diff, ".1e"),
                _num(r.p50_ms, ".3f"),
                _num(r.p90_ms, ".3f"),
                _num(r.threads, "d"),
                r.reason,
            )
    return table


def print_reports(reports: Sequence[ExportReport], title: str = "Export verification") -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))
    console.print(render_table(reports, title))
    for rep in reports:
        for note in rep.notes:
            console.print(f"[dim]{rep.prototype}: {note}[/dim]")


def write_json(path: str | Path, payload: Any) -> Path:
    """Atomically write ``payload`` as indented JSON."""
    p = Path(path)
    atomic_write_text(p, json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return p
