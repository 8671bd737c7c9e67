"""The field-trial report of a run directory: ``report.json`` (every figure's data) and
``report.html`` (one self-contained page, plots embedded as PNG data URIs).

    from coordinator.report import write_report
    html_path, json_path = write_report("runs/demo")
"""

from coordinator.report.data import ReportError, build_report
from coordinator.report.write import write_report

__all__ = ["ReportError", "build_report", "write_report"]
