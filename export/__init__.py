"""ONNX, TFLite and ExecuTorch export of prototype models, int8 quantisation, and
verification. Each format is a registered unit of :mod:`export.formats`.

``import export`` is cheap: it loads no converter, no runtime and not torch.
Names are resolved on first use:

- :func:`export_run` (run directory -> every prototype exported, verified, reported),
  :func:`export_checkpoint`, :func:`export_model`, :func:`export_programs`,
  :class:`ExportOptions`;
- :func:`resolve_format`, :func:`format_units` (the format units);
- :func:`load_artifact` / :func:`predict` (what an edge agent runs), :func:`read_metadata`,
  :class:`ArtifactMetadata`.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ArtifactError": "export.common",
    "ExportError": "export.common",
    "ArtifactMetadata": "export.metadata",
    "read_metadata": "export.metadata",
    "load_artifact": "export.runtimes",
    "predict": "export.runtimes",
    "available_runtimes": "export.runtimes",
    "RuntimeUnavailableError": "export.runtimes",
    "ExportOptions": "export.pipeline",
    "export_checkpoint": "export.pipeline",
    "export_model": "export.pipeline",
    "export_programs": "export.pipeline",
    "FormatUnit": "export.formats",
    "format_units": "export.formats",
    "resolve_format": "export.formats",
    "ExportReport": "export.report",
    "export_run": "export.run_export",
    "RunExport": "export.run_export",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
