"""``report.html``: one self-contained page (inline CSS, PNG data URIs, no script, no
external address) and ``report.json`` beside it."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from html import escape
from pathlib import Path
from typing import Any

from coordinator.report import plots
from coordinator.report.data import EXPORT_FIELDS, build_report
from takfl.files import atomic_write_text
from takfl.run_layout import REPORT_HTML, REPORT_JSON

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;
max-width:1100px;color:#1b1b1b;background:#fff;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}h2{font-size:1.2em;margin-top:28px;
border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:.9em}.missing{color:#777;font-style:italic}
table{border-collapse:collapse;font-size:.85em;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f5f7}td.l,th.l{text-align:left}
img{max-width:100%;height:auto}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:1.4em}.bad{color:#c62828}.ok{color:#2e7d32}
"""


def _img(png: bytes | None, alt: str, missing: str) -> str:
    if png is None:
        return f'<p class="missing">{escape(missing)}</p>'
    data = base64.b64encode(png).decode()
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    head = "".join(
        f'<th class="{"l" if i < left else ""}">{escape(h)}</th>' for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"l" if i < left else ""}">{escape(_fmt(c))}</td>'
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _cards(rep: dict[str, Any]) -> str:
    main = rep["final"].get(rep["algorithm"], {})
    cards = [(f"tier {p}", f"{a:.1f}%") for p, a in main.items()]
    timeline = rep["stragglers"]
    sampled = sum(t["sampled"] for t in timeline)
    answered = sum(t["answered"] for t in timeline)
    refused = sum(sum(t["refused"].values()) for t in timeline)
    cards += [("rounds", str(rep["rounds"])), ("updates", f"{answered}/{sampled}")]
    cards.append(("refused", str(refused)))
    out = "".join(
        f'<div class="card">{escape(k)}<b class="{"bad" if k == "refused" and v != "0" else ""}">'
        f"{escape(v)}</b></div>"
        for k, v in cards
    )
    return f'<div class="cards">{out}</div>'


AGENT_COLUMNS = [
    "agent",
    "tier",
    "platform",
    "runtimes",
    "updates",
    "refused",
    "mean train s",
    "peak RSS MB",
    "limit MB",
    "sent KiB",
    "received KiB",
    "retries",
    "min slack s",
    "implausible (not measurements)",
]
EXPORT_COLUMNS = [  # headers of EXPORT_FIELDS
    "tier",
    "format",
    "quant",
    "runtime",
    "status",
    "size MB",
    "accuracy %",
    "agreement %",
    "max |diff|",
    "p50 ms",
]


def _head(rep: dict[str, Any]) -> list[str]:
    """Document head, title and the line of run facts."""
    title = escape(rep["config"] or rep["run"])
    phase = f" · phase {escape(str(rep['phase']))}" if rep["phase"] else ""
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>takfl-edge field-trial report: {title}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Field-trial report: {title}</h1>",
        f'<p class="meta">run <code>{escape(rep["run"])}</code> · algorithm '
        f"<b>{escape(rep['algorithm'])}</b> · {rep['rounds']} round(s)"
        + phase
        + f" · generated {escape(rep['generated'])}</p>",
    ]


def _accuracy(rep: dict[str, Any]) -> list[str]:
    """Accuracy per round (plot) and the final accuracy of every algorithm, the run's first."""
    main, finals, protos = rep["algorithm"], rep["final"], rep["prototypes"]
    rows = [
        [alg, *[finals[alg].get(p) for p in protos]]
        for alg in sorted(finals, key=lambda a: (a != main, a))
    ]
    return [
        "<h2>Test accuracy per tier</h2>",
        _img(plots.accuracy_plot(rep["accuracy"], main), "accuracy per round", "no rounds"),
        _table(["algorithm", *[f"{p} final %" for p in protos]], rows),
    ]


def _privacy(rep: dict[str, Any]) -> list[str]:
    """Epsilon spent per round and tier (private runs only)."""
    rows = rep.get("privacy") or []
    if not rows:
        return []
    delta = rows[0]["delta"]
    return [
        f"<h2>Privacy spent (epsilon at delta {delta:g}, central DP)</h2>",
        _table(
            ["round", "tier", "epsilon", "noise multiplier", "clip norm"],
            [
                [
                    r["round"],
                    r["prototype"],
                    f"{r['epsilon']:.3f}",
                    f"{r['noise_multiplier']:.3g}",
                    f"{r['clip_norm']:.3g}",
                ]
                for r in rows
            ],
            left=2,
        ),
    ]


def _lambdas(rep: dict[str, Any]) -> list[str]:
    """The merge coefficients of the run's algorithm (or the first that has some)."""
    main = rep["algorithm"]
    lam_alg = main if main in rep["lambdas"] else next(iter(rep["lambdas"]), None)
    lam_grids = rep["lambdas"].get(lam_alg, {}) if lam_alg else {}
    return [
        f"<h2>Merge coefficients λ per student ({escape(str(lam_alg or main))})</h2>",
        _img(
            plots.lambda_heatmap(lam_grids),
            "lambda heatmap",
            f"{main} reports no merge coefficients",
        ),
    ]


def _fleet(rep: dict[str, Any]) -> list[str]:
    """The devices, stragglers and traffic plots (empty notes for simulations)."""
    return [
        "<h2>Devices: training time and memory per tier</h2>",
        _img(
            plots.device_plot(rep["devices"]),
            "train time and peak RSS per tier",
            "no agent telemetry in this run (simulations have none)",
        ),
        "<h2>Stragglers per round</h2>",
        _img(plots.straggler_plot(rep["stragglers"]), "straggler timeline", "no rounds"),
        "<h2>Traffic per round and tier</h2>",
        _img(
            plots.traffic_plot(rep["traffic"]),
            "bytes per round per tier",
            "no traffic record in this run (simulations have none)",
        ),
    ]


def _agents(rep: dict[str, Any]) -> list[str]:
    """One row per agent of the telemetry log."""
    rows = [
        [
            a["agent_id"],
            a["prototype"],
            a["platform"],
            a["runtimes"],
            a["updates"],
            a["refused"],
            a["mean_train_s"],
            a["peak_rss_mb"],
            a["rss_limit_mb"],
            a["bytes_sent"] // 1024,
            a["bytes_received"] // 1024,
            a["retries"],
            a["min_slack_s"],
            ", ".join(a.get("implausible", [])),
        ]
        for a in rep["agents"]
    ]
    if not rows:
        return [
            "<h2>Agents</h2>",
            '<p class="missing">no agent registered through the telemetry log</p>',
        ]
    return ["<h2>Agents</h2>", _table(AGENT_COLUMNS, rows, left=4)]


def _exports(rep: dict[str, Any]) -> list[str]:
    """One row per verified export of the run."""
    rows = [[e[k] for k in EXPORT_FIELDS] for e in rep["exports"]]
    if not rows:
        missing = "no exports in this run (takfl-export --run RUN adds them)"
        return ["<h2>Exports</h2>", f'<p class="missing">{missing}</p>']
    return ["<h2>Exports</h2>", _table(EXPORT_COLUMNS, rows, left=5)]


def _releases_html(releases: dict[str, list[dict[str, Any]]] | None) -> str:
    """Each release's state per tier, and on-device latency per hardware class."""
    if not releases or not releases.get("rollouts"):
        return '<p class="missing">nothing released from this run (takfl-coordinator release)</p>'
    rollouts = [
        [
            r["prototype"],
            r["version"],
            r["action"],
            r["state"],
            r["stage"],
            f"{r['offered']}/{r['devices']}",
            r["installed"],
            ", ".join(f"{k} {n}" for k, n in r["failed"].items()) or "0",
            r["rolled_back"],
            r["bytes"] // 1024,
            r["install_s"],
            r["rollout_s"],
            r["halt_reason"],
        ]
        for r in releases["rollouts"]
    ]
    latency = [
        [
            r["hardware_class"],
            r["prototype"],
            r["version"],
            r["runtime"],
            r["devices"],
            r["p50_ms"],
            r["p99_ms"],
            r["worst_p99_ms"],
            r["peak_rss_mb"],
        ]
        for r in releases.get("latency", [])
    ]
    head = ["tier", "version", "action", "state", "stage", "offered", "installed"]
    parts = [
        _table(
            [
                *head,
                "failed (reason)",
                "rolled back",
                "KiB",
                "install s",
                "rollout s",
                "halted because",
            ],
            rollouts,
            left=4,
        )
    ]
    if latency:
        parts += [
            "<h3>On-device inference latency at batch 1 (health check)</h3>",
            _table(
                [
                    "hardware",
                    "tier",
                    "version",
                    "runtime",
                    "devices",
                    "p50 ms",
                    "p99 ms",
                    "worst p99 ms",
                    "peak RSS MB",
                ],
                latency,
                left=4,
            ),
        ]
    return "\n".join(parts)


def _releases(rep: dict[str, Any]) -> list[str]:
    """Each release's state per tier and the devices' latency (empty note without any)."""
    return ["<h2>Releases to the devices</h2>", _releases_html(rep.get("releases"))]


def render_html(rep: dict[str, Any]) -> str:
    """The page for a report dict (see ``coordinator.report.data.build_report``)."""
    parts = [
        *_head(rep),
        _cards(rep),
        *_accuracy(rep),
        *_privacy(rep),
        *_lambdas(rep),
        *_fleet(rep),
        *_agents(rep),
        *_exports(rep),
        *_releases(rep),
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    report: Callable[[str], None] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.html`` (default ``RUN/report.html``) and ``report.json`` beside it."""
    rep = build_report(run_dir)
    html_path = Path(out) if out is not None else Path(run_dir) / REPORT_HTML
    json_path = html_path.with_name(REPORT_JSON)
    atomic_write_text(json_path, json.dumps(rep, indent=1, sort_keys=True))
    atomic_write_text(html_path, render_html(rep))
    if report is not None:
        report(f"report: {html_path} ({json_path.name} beside it)")
    return html_path, json_path
