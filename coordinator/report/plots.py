"""The report's figures: each a function from report data to PNG bytes (matplotlib, Agg).

A figure whose data is absent returns None and the page says what is missing.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

DPI = 96
OUTCOME_COLOURS = {"answered": "#2e7d32", "late": "#f9a825", "missing": "#c62828"}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def accuracy_plot(curves: dict[str, dict[str, list[list[float]]]], main: str) -> bytes | None:
    """Test accuracy per round, one panel per tier, one line per algorithm (band: ±std)."""
    protos = list(dict.fromkeys(p for by_p in curves.values() for p in by_p))
    if not protos:
        return None
    fig, axes = plt.subplots(1, len(protos), figsize=(4.2 * len(protos), 3.2), squeeze=False)
    algs = sorted(curves, key=lambda a: (a != main, a))
    for ax, p in zip(axes[0], protos, strict=True):
        for alg in algs:
            pts = np.array(curves[alg].get(p, []), dtype=float)
            if not len(pts):
                continue
            width = 2.4 if alg == main else 1.3
            (line,) = ax.plot(pts[:, 0], pts[:, 1], marker="o", ms=3, lw=width, label=alg)
            if np.any(pts[:, 2] > 0):
                ax.fill_between(
                    pts[:, 0],
                    pts[:, 1] - pts[:, 2],
                    pts[:, 1] + pts[:, 2],
                    color=line.get_color(),
                    alpha=0.15,
                )
        ax.set_title(f"tier {p}")
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    return _png(fig)


def lambda_heatmap(grids: dict[str, dict[str, Any]]) -> bytes | None:
    """Merge coefficients: one heatmap per student, teachers x rounds."""
    if not grids:
        return None
    students = list(grids)
    fig, axes = plt.subplots(1, len(students), figsize=(4.2 * len(students), 2.8), squeeze=False)
    image = None
    for ax, s in zip(axes[0], students, strict=True):
        g = grids[s]
        values = np.array(g["values"], dtype=float)
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(f"student {s}")
        ax.set_yticks(range(len(g["teachers"])), g["teachers"])
        ax.set_ylabel("teacher")
        ax.set_xticks(range(len(g["rounds"])), [str(r) for r in g["rounds"]])
        ax.set_xlabel("round")
        if values.size <= 60:
            for (i, j), v in np.ndenumerate(values):
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if v < 0.6 else "black",
                )
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="λ", shrink=0.9)
    return _png(fig)


def device_plot(devices: dict[str, dict[str, Any]]) -> bytes | None:
    """Distributions over every update, per tier: train time and peak RSS (limit dashed)."""
    tiers = [t for t, d in devices.items() if d["train_s"] or d["peak_rss_mb"]]
    if not tiers:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    a1.boxplot([devices[t]["train_s"] or [0.0] for t in tiers], tick_labels=tiers)
    a1.set_title("local training wall time per update")
    a1.set_ylabel("seconds")
    a1.set_xlabel("tier")
    a2.boxplot([devices[t]["peak_rss_mb"] or [0.0] for t in tiers], tick_labels=tiers)
    for i, t in enumerate(tiers, start=1):
        limit = devices[t].get("rss_limit_mb")
        if limit:
            a2.hlines(limit, i - 0.4, i + 0.4, colors="#c62828", linestyles="dashed")
            a2.annotate(
                f"limit {limit:.0f}", (i + 0.05, limit), fontsize=7, color="#c62828", va="bottom"
            )
    a2.set_title("peak resident memory of the agent (MB)")
    a2.set_ylabel("MB")
    a2.set_xlabel("tier")
    for ax in (a1, a2):
        ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def straggler_plot(timeline: list[dict[str, Any]]) -> bytes | None:
    """Per round: sampled clients split into answered / late / missing; refusals by reason."""
    if not timeline:
        return None
    rounds = [t["round"] for t in timeline]
    reasons = sorted({r for t in timeline for r in t["refused"]})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    bottom = np.zeros(len(rounds))
    for outcome, colour in OUTCOME_COLOURS.items():
        vals = np.array([t[outcome] for t in timeline], dtype=float)
        a1.bar(rounds, vals, bottom=bottom, color=colour, label=outcome)
        bottom += vals
    a1.set_title("sampled clients per round")
    a1.set_xlabel("round")
    a1.set_ylabel("clients")
    a1.legend(fontsize=8, loc="lower left")
    if reasons:
        bottom = np.zeros(len(rounds))
        for reason in reasons:
            vals = np.array([t["refused"].get(reason, 0) for t in timeline], dtype=float)
            a2.bar(rounds, vals, bottom=bottom, label=reason)
            bottom += vals
        a2.legend(fontsize=8, loc="lower left")
        a2.yaxis.get_major_locator().set_params(integer=True)
    else:
        a2.text(0.5, 0.5, "no update was refused", ha="center", va="center", transform=a2.transAxes)
    a2.set_title("refused updates per round, by reason")
    a2.set_xlabel("round")
    for ax in (a1, a2):
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def traffic_plot(rows: list[dict[str, Any]]) -> bytes | None:
    """MQTT payload bytes per round, stacked by tier: global models down, updates up."""
    if not rows:
        return None
    rounds = sorted({r["round"] for r in rows})
    tiers = list(dict.fromkeys(r["prototype"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, title in (
        (axes[0], "down", "global models sent with tasks"),
        (axes[1], "up", "accepted updates received"),
    ):
        bottom = np.zeros(len(rounds))
        for t in tiers:
            vals = (
                np.array(
                    [
                        sum(r[key] for r in rows if r["round"] == rd and r["prototype"] == t)
                        for rd in rounds
                    ],
                    dtype=float,
                )
                / 1024
            )
            ax.bar(rounds, vals, bottom=bottom, label=f"tier {t}")
            bottom += vals
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylabel("KiB")
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    return _png(fig)
