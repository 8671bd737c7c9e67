"""The run directory holds under crashes and bad files: a SIGKILL at any write leaves
state and metrics in agreement, corrupt or NaN checkpoints are refused by name (exit 2),
and persisted updates that no longer validate are skipped on resume."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from coordinator.broker.net import free_port
from coordinator.cli import app
from coordinator.store import RunStore, RunStoreError
from coordinator.transport.base import ClientUpdate
from takfl.wire.validation import AgentRecord
from tests.crash_run import make_run, small_config

# Every test here runs the coordinator in child processes (one finished run, then SIGKILLs
# and resumes): end to end, so the whole file is in the slow tier. The run store's unit
# tests are in test_run_store.py.
pytestmark = pytest.mark.slow

ENV_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def crash_run(root: Path, rounds: int, point: str, *, resume: bool = False) -> int:
    cmd = [sys.executable, "-m", "tests.crash_run", str(root), str(rounds), point]
    env = {**os.environ, **ENV_THREADS}
    proc = subprocess.run(
        [*cmd, "--resume"] if resume else cmd, env=env, capture_output=True, timeout=600
    )
    return proc.returncode


def metric_keys(root: Path) -> Counter[tuple[int, str]]:
    lines = (root / "metrics.jsonl").read_text().splitlines()
    return Counter((json.loads(x)["round"], json.loads(x)["prototype"]) for x in lines)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finished") / "run"
    assert crash_run(root, 1, "none") == 0
    return root


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("point", ["save_global", "write_state", "commit_metrics"])
def test_sigkill_at_any_write_leaves_one_metrics_line_per_round_and_prototype(
    finished_run: Path, tmp_path: Path, point: str
) -> None:
    root = copy_run(finished_run, tmp_path / "run")
    # round 2 dies by SIGKILL right after this write
    assert crash_run(root, 2, point, resume=True) == -9
    state = json.loads((root / "state.json").read_text())
    store = RunStore(root)
    # whatever the file holds meanwhile, the reader reports only committed rounds
    assert {r["round"] for r in store.metrics()} == set(range(1, state["round"] + 1))

    assert crash_run(root, 2, "none", resume=True) == 0
    keys = metric_keys(root)
    assert keys == Counter({(r, p): 1 for r in (1, 2) for p in ("S", "M", "L")}), keys
    assert json.loads((root / "state.json").read_text())["round"] == 2


def resume_cli(root: Path) -> tuple[int, str]:
    cfg = root / "config.yaml"
    (root / "agents.json").write_text(json.dumps({"agents": []}))
    out = CliRunner().invoke(
        app,
        [
            "serve",
            "--config",
            str(cfg),
            "--run-dir",
            str(root),
            "--resume",
            "--rounds",
            "2",
            "--port",
            str(free_port()),
            "--device",
            "cpu",
            "--no-export",
            "--wait-all",
            "1",
        ],
        terminal_width=400,
    )
    return out.exit_code, "".join(out.output.split())  # rich folds long paths


def test_truncated_checkpoint_is_refused_by_name(finished_run: Path, tmp_path: Path) -> None:
    root = copy_run(finished_run, tmp_path / "run")
    path = root / "models" / "M" / "round-1.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    code, output = resume_cli(root)
    assert code == 2, output
    assert "M/round-1.safetensors" in output and "SHA-256" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("digest_kept", [True, False], ids=["digest-updated", "old-run"])
def test_nan_checkpoint_is_refused_by_name(
    finished_run: Path, tmp_path: Path, digest_kept: bool
) -> None:
    root = copy_run(finished_run, tmp_path / "run")
    path = root / "models" / "L" / "round-1.safetensors"
    state = load_file(str(path))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(path))
    run_state = json.loads((root / "state.json").read_text())
    if digest_kept:  # the attacker (or bug) also rewrote the recorded digest
        run_state["checkpoints"]["L"] = hashlib.sha256(path.read_bytes()).hexdigest()
    else:  # a run directory from before digests were recorded
        del run_state["checkpoints"]
    (root / "state.json").write_text(json.dumps(run_state))
    code, output = resume_cli(root)
    assert code == 2, output
    assert "L/round-1.safetensors" in output and "NaN" in output
    with pytest.raises(RunStoreError, match="NaN"):
        RunStore(root).load_global("L", 1)


def poisoned_pending(root: Path, update: ClientUpdate) -> None:
    RunStore(root).save_pending(update)


def pending_update(root: Path, client: str, prototype: str, num_samples: int) -> ClientUpdate:
    state = RunStore(root).load_global(prototype, 1)
    return ClientUpdate(
        round_id=2, prototype=prototype, client_id=client, num_samples=num_samples, state=state
    )


def test_resume_skips_persisted_updates_that_no_longer_validate(
    finished_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = copy_run(finished_run, tmp_path / "run")
    cfg = small_config()
    registry = {
        cid: AgentRecord(agent_id=cid, prototype=cid.split("-")[0], secret=b"k")
        for cid in ("S-000", "S-001", "M-000", "M-001", "L-000")
    }
    # round 2 was open with three persisted updates when the coordinator stopped
    poisoned_pending(root, pending_update(root, "S-000", "S", 0))  # zero samples
    poisoned_pending(root, pending_update(root, "M-001", "M", 30))  # its agent gets revoked
    poisoned_pending(root, pending_update(root, "L-000", "L", 100))  # fine
    state = json.loads((root / "state.json").read_text())
    plan = {"S": ["S-000", "S-001"], "M": ["M-000", "M-001"], "L": ["L-000"]}
    assert set(plan) == {p.name for p in cfg.prototypes}
    state["open_round"] = {"id": 2, "plan": plan}
    (root / "state.json").write_text(json.dumps(state))
    del registry["M-001"]

    run = make_run(root, 2, resume=True)
    run.registry = registry
    with caplog.at_level(logging.WARNING):
        results = run.run()
    text = caplog.text
    assert "skipping persisted update of S-000 (round 2): no_samples" in text
    assert "skipping persisted update of M-001 (round 2): unknown_agent" in text
    assert "M-001 out of the round: no longer provisioned" in text
    assert results[0].received == {"S": 2, "M": 1, "L": 1}
    assert RunStore(root).read_state()["round"] == 2
