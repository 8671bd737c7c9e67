"""The run directory's layout and its state schema: declared here once, imported by the
run store, the report, the end-of-run export, the benchmarks and the tests.

    RUN/config.yaml                         the federation config the run uses
    RUN/state.json                          last completed round, plan of the current one,
                                            lambdas, accuracies, the SHA-256 of each
                                            prototype's checkpoint, the round's metrics
                                            (:class:`RunState`)
    RUN/models/<prototype>/round-<r>.safetensors
    RUN/metrics.jsonl                       one line per round per prototype
    RUN/telemetry.jsonl                     one line per event (coordinator.telemetry_log)
    RUN/report.html, RUN/report.json        the field-trial report (coordinator.report)
    RUN/pending/round-<r>/<client>.safetensors   accepted updates of the open round
    RUN/exports/<prototype>/                the exported artifacts of a prototype, with
                                            the export report (takfl-export --run)
    RUN/exports/report.json                 the export reports of every prototype
    RUN/releases/<prototype>/<version>.json the signed release metadata (coordinator.deploy)
    RUN/releases/blobs/<sha256>             release artifacts and reference files
    RUN/releases/rollouts.json              every rollout record
    RUN/releases/.lock                      held by the one release command at work
    RUN/root.json, RUN/release-key.pem      the demo's release root and key (takfl.release.keys)
    RUN/devices/<agent>/                    the demo agents' installed releases (A/B slots)

A ``simulate`` output folder holds ``metrics.jsonl`` too (several algorithms and
seeds), with ``results.json`` and ``accuracy.png``.

Names, path arithmetic and the state's bytes only: writing atomically and locking
are the run store's job (``coordinator.store``). No torch, so light readers (the
report, tests) need none.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config
from typing_extensions import NotRequired, TypedDict  # pydantic needs these before 3.12

CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
TELEMETRY_FILE = "telemetry.jsonl"
REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
MODELS_DIR = "models"
PENDING_DIR = "pending"
EXPORTS_DIR = "exports"
EXPORT_REPORT = "report.json"  # what takfl-export writes into each folder it fills
RESULTS_FILE = "results.json"  # simulate: final accuracy per algorithm, mean and std
PLOT_FILE = "accuracy.png"  # simulate: accuracy curves
CHECKPOINT_SUFFIX = ".safetensors"
RELEASES_DIR = "releases"
RELEASE_BLOBS_DIR = "blobs"  # under RELEASES_DIR
ROLLOUTS_FILE = "rollouts.json"  # under RELEASES_DIR
RELEASE_LOCK = ".lock"  # under RELEASES_DIR
DEVICES_DIR = "devices"  # the demo's agents' state directories

_ROUND = re.compile(r"^round-(\d+)$")


class RunLayoutError(ValueError):
    """A run directory's file is missing or does not follow the layout."""


@with_config(ConfigDict(extra="allow"))
class OpenRound(TypedDict):
    """The round being collected: its id and the agents sampled per prototype."""

    id: int
    plan: dict[str, list[str]]


@with_config(ConfigDict(extra="allow"))
class RunState(TypedDict):
    """``state.json``: what the coordinator has committed. Only ``round`` is always
    there (a run from an older version, or a hand-made one, may lack the rest); keys
    this version does not know are kept as they are."""

    round: int  # last completed round; 0 before the first
    run_id: NotRequired[str]  # the run's id on the wire (32 hex digits), made when it starts
    phase: NotRequired[str]  # starting | collecting | round complete | finished
    config: NotRequired[str]  # the federation config's name
    algorithm: NotRequired[str]
    seed: NotRequired[int]
    accuracy: NotRequired[dict[str, float]]  # prototype -> test accuracy, percent
    lambdas: NotRequired[dict[str, dict[str, float] | None]]  # student -> teacher -> lambda
    open_round: NotRequired[OpenRound | None]
    checkpoints: NotRequired[dict[str, str]]  # prototype -> SHA-256 of its latest checkpoint
    round_metrics: NotRequired[list[dict[str, Any]]]  # the round's metrics.jsonl lines
    # private modes: per prototype its noise, clipping bound and release history
    # (coordinator.privacy.RunPrivacy.to_state)
    privacy: NotRequired[dict[str, Any]]
    updated: NotRequired[float]  # unix time of the last write


_STATE = TypeAdapter(RunState)


# -- paths -------------------------------------------------------------------


def round_folder(round_id: int) -> str:
    """Name of round ``round_id``'s folder (pending updates), e.g. ``round-3``."""
    return f"round-{round_id}"


def checkpoint_name(round_id: int) -> str:
    """File name of a prototype's global model after round ``round_id``."""
    return round_folder(round_id) + CHECKPOINT_SUFFIX


def checkpoint_round(path: str | Path) -> int | None:
    """The round a checkpoint file is of, None for a file not named like one."""
    name = Path(path).name
    if not name.endswith(CHECKPOINT_SUFFIX):
        return None
    m = _ROUND.match(name[: -len(CHECKPOINT_SUFFIX)])
    return int(m.group(1)) if m else None


def models_dir(run: str | Path, prototype: str) -> Path:
    """Folder of a prototype's checkpoints."""
    return Path(run) / MODELS_DIR / prototype


def model_path(run: str | Path, prototype: str, round_id: int) -> Path:
    """A prototype's global model after round ``round_id`` (0: the initial model)."""
    return models_dir(run, prototype) / checkpoint_name(round_id)


def checkpoints(run: str | Path, prototype: str) -> dict[int, Path]:
    """round -> checkpoint file of every ``round-<r>.safetensors`` of a prototype."""
    folder = models_dir(run, prototype)
    if not folder.is_dir():
        return {}
    found = {checkpoint_round(p): p for p in folder.glob(f"*{CHECKPOINT_SUFFIX}")}
    return {r: found[r] for r in sorted(r for r in found if r is not None)}


def latest_checkpoint(run: str | Path, prototype: str) -> Path:
    """The highest-numbered checkpoint of a prototype; :class:`RunLayoutError` if none."""
    found = checkpoints(run, prototype)
    if not found:
        folder = models_dir(run, prototype)
        raise RunLayoutError(f"no round-<r>{CHECKPOINT_SUFFIX} checkpoint in {folder}")
    return found[max(found)]


def pending_dir(run: str | Path, round_id: int) -> Path:
    """Folder of the accepted updates of open round ``round_id``."""
    return Path(run) / PENDING_DIR / round_folder(round_id)


def exports_dir(run: str | Path, prototype: str | None = None) -> Path:
    """Folder of a run's exports, or of one prototype's."""
    folder = Path(run) / EXPORTS_DIR
    return folder if prototype is None else folder / prototype


def export_report_path(run: str | Path) -> Path:
    """The export report of every prototype of a run (``takfl-export --run``)."""
    return exports_dir(run) / EXPORT_REPORT


def releases_dir(run: str | Path) -> Path:
    """Folder of a run's releases, their blobs and rollout records."""
    return Path(run) / RELEASES_DIR


def device_dir(run: str | Path, agent_id: str) -> Path:
    """A demo agent's state directory (its installed releases)."""
    return Path(run) / DEVICES_DIR / agent_id


# -- state -------------------------------------------------------------------


def encode_run_state(state: RunState) -> bytes:
    """The bytes of ``state.json``: indented JSON with sorted keys."""
    return json.dumps(state, indent=2, sort_keys=True).encode()


def decode_run_state(data: bytes | str, source: str = STATE_FILE) -> RunState:
    """``state.json``'s content, checked against :class:`RunState` (unknown keys kept).

    Raises:
        RunLayoutError: not JSON, or a field of the wrong kind (``source`` names it).
    """
    try:
        raw = json.loads(data)
    except json.JSONDecodeError as e:
        raise RunLayoutError(f"{source} is not valid JSON ({e})") from e
    if not isinstance(raw, dict) or "round" not in raw:
        raise RunLayoutError(f"{source} lacks the 'round' entry")
    try:
        return _STATE.validate_python(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise RunLayoutError(f"{source} is not a run state: {problems}") from e


def read_run_state(run: str | Path) -> RunState:
    """The state of the run in folder ``run``.

    Raises:
        RunLayoutError: no ``state.json`` there, or one that does not decode.
    """
    path = Path(run) / STATE_FILE
    if not path.is_file():
        raise RunLayoutError(f"{run} has no {STATE_FILE}; is it a run directory?")
    return decode_run_state(path.read_bytes(), str(path))
