"""The field-trial report: data gathered from a run directory, one self-contained HTML
page, rendered by a real headless Chromium with no console message, and a screenshot."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.report import ReportError, build_report, write_report
from coordinator.store import RunStore
from coordinator.telemetry_log import TelemetryRecorder
from takfl.run_layout import METRICS_FILE, REPORT_JSON, export_report_path
from takfl.wire.chunking import blob_ref
from takfl.wire.messages import UpdateHeader
from takfl.wire.telemetry import PlatformInfo, Telemetry
from tests.browser import CHROMIUM, render

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/install)"
)
PROTOS = ("S", "M", "L")


def header(round_id: int, agent: str, proto: str, train_s: float, rss: float) -> UpdateHeader:
    """An accepted update header as an agent would send it (unsigned: the recorder only
    reads what the transport already verified)."""
    return UpdateHeader(
        round_id=round_id,
        agent_id=agent,
        prototype=proto,
        base_digest="0" * 64,
        blob=blob_ref(b"x" * (1000 * (1 + PROTOS.index(proto))), 4096),
        compression="fp16",
        num_samples=50,
        telemetry=Telemetry(
            platform=PlatformInfo(
                machine="aarch64",
                system="Linux",
                python="3.11.2",
                torch="2.13.0+cpu",
                cpus=4,
                runtimes={"onnxruntime": "1.31.1"},
            ),
            train_s=train_s,
            samples_per_s=50 / train_s,
            peak_rss_mb=rss,
            rss_limit_mb=512.0,
            threads=1,
            bytes_sent=10_000 * round_id,
            bytes_received=40_000 * round_id,
            retries=round_id - 1,
            deadline_slack_s=30.0 - train_s,
        ),
    )


def write_metrics(store: RunStore, records: list[dict]) -> None:  # type: ignore[type-arg]
    """metrics.jsonl as serve and simulate write it: one JSON object per line."""
    store.root.mkdir(parents=True, exist_ok=True)
    (store.root / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))


def fake_run(root: Path, rounds: int = 3) -> Path:
    """A run directory written through the run store and the telemetry recorder, as
    serve writes it: two algorithms (a run with baselines), lambdas, telemetry events,
    a refused and a late update, and an export report."""
    store = RunStore(root)
    store.write_state(
        {"round": rounds, "phase": "finished", "config": "digits-trial", "algorithm": "takfl"}
    )
    rng = np.random.default_rng(0)
    records = []
    for alg in ("takfl", "fedavg"):
        for r in range(1, rounds + 1):
            for i, p in enumerate(PROTOS):
                lam = {t: w for t, w in zip(PROTOS, rng.dirichlet([1, 1, 1]), strict=True)}
                records.append(
                    {
                        "algorithm": alg,
                        "seed": 0,
                        "round": r,
                        "prototype": p,
                        "test_accuracy": 40 + 10 * i + 5 * r - (5 if alg == "fedavg" else 0),
                        "lambdas": lam if alg == "takfl" else None,
                        "clients": 2,
                        "sampled": 2,
                    }
                )
    write_metrics(store, records)
    rec = TelemetryRecorder(store)
    agents = {p: [f"{p}-000", f"{p}-001"] for p in PROTOS}
    for p, ids in agents.items():
        for a in ids:
            rec.registered(a, p, Telemetry(platform=PlatformInfo(machine="x86_64")))
            rec.presence(a, p, True)
    for r in range(1, rounds + 1):
        rec.round_started(r, agents)
        for p, ids in agents.items():
            rec.tasks_sent(r, p, len(ids), 20_000 * (1 + PROTOS.index(p)))
            for k, a in enumerate(ids):
                if r == 2 and a == "S-001":
                    rec.refused(a, p, r, "expired")
                    continue
                rec.accepted(header(r, a, p, 1.0 + PROTOS.index(p) + 0.3 * k, 200.0 + 100 * k))
        if r == 3:
            rec.refused("M-001", "M", r, "bad_signature")
        rec.round_finished(r, 12.5)
    export_report_path(root).parent.mkdir()
    export_report_path(root).write_text(
        json.dumps(
            {
                "prototypes": [
                    {
                        "rows": [
                            {
                                "prototype": "S",
                                "format": "onnx",
                                "quantization": "none",
                                "runtime": "onnxruntime",
                                "status": "OK",
                                "size_mb": 0.01,
                                "accuracy": 71.2,
                                "agreement": 100.0,
                                "max_abs_diff": 1e-6,
                                "p50_ms": 0.02,
                            }
                        ]
                    }
                ]
            }
        )
    )
    return root


def test_report_data_from_a_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rep = build_report(fake_run(tmp_path / "run"))
    assert rep["algorithm"] == "takfl" and rep["rounds"] == 3
    assert set(rep["accuracy"]) == {"takfl", "fedavg"}  # the baseline is kept
    assert rep["final"]["takfl"]["L"] == pytest.approx(75.0)
    grid = rep["lambdas"]["takfl"]["M"]
    assert grid["rounds"] == [1, 2, 3] and grid["teachers"] == ["S", "M", "L"]
    assert np.allclose(np.array(grid["values"]).sum(axis=0), 1.0)  # simplex per round
    assert "fedavg" not in rep["lambdas"]
    timeline = {t["round"]: t for t in rep["stragglers"]}
    assert timeline[2] == {
        "round": 2,
        "sampled": 6,
        "answered": 5,
        "late": 1,
        "missing": 0,
        "refused": {"expired": 1},
        "duration_s": 12.5,
    }
    assert timeline[3]["refused"] == {"bad_signature": 1} and timeline[3]["answered"] == 6
    assert rep["devices"]["L"]["rss_limit_mb"] == 512.0
    assert len(rep["devices"]["S"]["train_s"]) == 5  # 6 updates less the late one
    traffic = {(t["round"], t["prototype"]): t for t in rep["traffic"]}
    assert traffic[(1, "M")] == {"round": 1, "prototype": "M", "down": 80_000, "up": 4000}
    s1 = next(a for a in rep["agents"] if a["agent_id"] == "S-001")
    assert s1["updates"] == 2 and s1["refused"] == 1 and "aarch64 Linux" in s1["platform"]
    assert rep["exports"][0]["status"] == "OK"


def test_report_refuses_a_folder_without_rounds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ReportError, match="no metrics"):
        build_report(tmp_path)
    out = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert out.exit_code == 2 and "no metrics.jsonl records" in " ".join(out.output.split())


def assert_self_contained(html: str) -> None:
    assert "<script" not in html
    # no address outside the page: every src/href is a data URI
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html)
    assert refs and all(r.startswith("data:") for r in refs), refs
    assert not re.search(r"https?://", html)


def png_is_not_blank(path: Path) -> None:
    img = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert img.shape[0] > 500 and img.shape[1] > 500
    assert img.std() > 10, "the screenshot is one flat colour"
    assert (img < 100).mean() > 0.005, "hardly any dark pixels: nothing rendered"


@needs_chromium
def test_console_capture_sees_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The console check below can fail: a page with a script error is caught."""
    page = tmp_path / "bad.html"
    page.write_text('<html><body><h1>x</h1><script>console.error("boom"); nope();</script>')
    messages = render(page, tmp_path / "bad.png", size=(600, 400))
    assert any("boom" in m for m in messages)
    assert any("nope is not defined" in m for m in messages)


@needs_chromium
def test_report_renders_in_chromium(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = fake_run(tmp_path / "run")
    out = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "r.html")])
    assert out.exit_code == 0, out.output
    html = (tmp_path / "r.html").read_text()
    data = json.loads((tmp_path / REPORT_JSON).read_text())
    assert data["config"] == "digits-trial"
    assert_self_contained(html)
    assert html.count("data:image/png;base64,") == 5  # every figure is there
    shot = tmp_path / "report.png"
    messages = render(tmp_path / "r.html", shot)
    assert messages == []
    png_is_not_blank(shot)


@needs_chromium
def test_report_of_a_simulation_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A simulate output (metrics only, no telemetry) still gives a readable page."""
    store = RunStore(tmp_path)
    write_metrics(
        store,
        [
            {
                "algorithm": "fedavg",
                "seed": s,
                "round": r,
                "prototype": "S",
                "test_accuracy": 50.0 + r + s,
                "lambdas": None,
                "clients": 1,
                "sampled": 1,
            }
            for s in (0, 1)
            for r in (1, 2)
        ],
    )
    html_path, _ = write_report(tmp_path)
    html = html_path.read_text()
    assert "no agent telemetry" in html and html.count("data:image/png") == 2
    assert render(html_path, tmp_path / "s.png") == []


def test_telemetry_log_stays_bounded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Reconnects do not repeat registrations, and a flood of refusals from one agent
    writes at most MAX_REFUSALS records while the round record counts them all."""
    from coordinator.telemetry_log import MAX_REFUSALS

    store = RunStore(tmp_path)
    rec = TelemetryRecorder(store)
    platform = Telemetry(platform=PlatformInfo(machine="armv7l"))
    for _ in range(5):
        rec.registered("S-000", "S", platform)
    rec.registered("S-000", "S", Telemetry(platform=PlatformInfo(machine="aarch64")))
    rec.round_started(1, {"S": ["S-000"]})
    for _ in range(MAX_REFUSALS + 40):
        rec.refused("S-000", "S", 1, "malformed")
    rec.round_finished(1, 1.0)
    events = store.telemetry()
    kinds = [e["kind"] for e in events]
    assert kinds.count("register") == 2  # first one, then the changed platform
    assert kinds.count("refusal") == MAX_REFUSALS
    (round_rec,) = [e for e in events if e["kind"] == "round"]
    assert round_rec["refused"] == {"malformed": MAX_REFUSALS + 40}
    assert round_rec["missing"] == {"S": ["S-000"]}
