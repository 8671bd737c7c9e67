"""The coordinator's registry of known agents: id, prototype, profile, secret and
sample allowance.

Written by ``takfl-coordinator provision`` (mode 0600), read by ``serve``; an
agent that is not in it, or claims another prototype, is refused. The allowance
(``max_samples``, the largest sample count, i.e. FedAvg weight, the agent may
claim) is set at provisioning: ``--max-samples N`` for every agent of the fleet, or
per agent here. Left open, it is pinned by the agent's first accepted registration
(and written back here), which is accepted only at or below the fleet's ceiling
(``sample_ceiling``: ``--sample-ceiling N``, default :data:`DEFAULT_SAMPLE_CEILING`);
a first registration above it is refused, not pinned. A replacement device (or one
whose data grew) is re-provisioned: ``provision --agent ID [--max-samples N]`` gives
the agent a new secret, so only the device holding it registers with the new
allowance (the old secret stops working), and leaves every other agent as it was.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from takfl.config import FederationConfig
from takfl.files import atomic_write_text
from takfl.secret_files import write_secret_file
from takfl.wire.signing import generate_secret

REGISTRY_FILE = "agents.json"
SECRETS_DIR = "secrets"  # <agent id>.secret for every agent, beside the registry


class RegistryError(ValueError):
    """The agent registry is missing or malformed."""


MAX_CLIENTS = 100_000  # agents one provisioning run writes secrets for
DEFAULT_SAMPLE_CEILING = 100_000  # an open allowance is pinned only at or below this


@dataclass(frozen=True, kw_only=True)
class RegistryEntry:
    agent_id: str
    prototype: str
    profile: str
    secret_hex: str
    max_samples: int | None = None  # None: pinned by the first accepted registration...
    sample_ceiling: int | None = DEFAULT_SAMPLE_CEILING  # ...at or below this (None: any)

    @property
    def secret(self) -> bytes:
        return bytes.fromhex(self.secret_hex)


def secret_path(out_dir: Path, agent_id: str) -> Path:
    """Where provisioning into ``out_dir`` writes an agent's secret file."""
    return out_dir / SECRETS_DIR / f"{agent_id}.secret"


def save_registry(path: Path, agents: list[RegistryEntry]) -> None:
    """Atomically write the registry, readable by its owner only (it holds the secrets)."""
    body = json.dumps({"agents": [asdict(a) for a in agents]}, indent=2)
    atomic_write_text(path, body, mode=0o600)


def load_registry(path: Path) -> dict[str, RegistryEntry]:
    try:
        raw = json.loads(path.read_text())
        agents = [RegistryEntry(**a) for a in raw["agents"]]
    except FileNotFoundError as e:
        raise RegistryError(f"no agent registry at {path}; run takfl-coordinator provision") from e
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise RegistryError(f"{path} is not an agent registry ({e})") from e
    for a in agents:
        for name in ("max_samples", "sample_ceiling"):
            n = getattr(a, name)
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
                raise RegistryError(f"{path}: {a.agent_id}: {name} must be a positive integer")
    return {a.agent_id: a for a in agents}


class AllowanceBook:
    """Writes an agent's sample allowance into the registry file the first time it is
    pinned (by the agent's first accepted registration), so a restart keeps it."""

    def __init__(self, path: Path, records: dict[str, RegistryEntry]) -> None:
        self.path = path
        self.records = dict(records)
        self._lock = threading.Lock()

    def pin(self, agent_id: str, max_samples: int) -> None:
        with self._lock:
            record = self.records.get(agent_id)
            if record is None or record.max_samples is not None:
                return
            self.records[agent_id] = replace(record, max_samples=max_samples)
            save_registry(self.path, list(self.records.values()))


def check_client_count(cfg: FederationConfig) -> None:
    """Refuse to provision more agents than :data:`MAX_CLIENTS`."""
    total = sum(p.clients for p in cfg.prototypes)
    if total > MAX_CLIENTS:
        raise RegistryError(
            f"the config asks for {total} clients; provision writes secrets for at most "
            f"{MAX_CLIENTS} at once (lower prototypes[].clients)"
        )


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise RegistryError(f"{name} must be at least 1, got {value}")


def provision_agents(
    cfg: FederationConfig,
    out_dir: Path,
    *,
    max_samples: int | None = None,
    sample_ceiling: int | None = DEFAULT_SAMPLE_CEILING,
) -> list[RegistryEntry]:
    """One agent per configured client (ids like ``M-003``), each with its own secret file
    ``secrets/<id>.secret`` to copy onto that device; the registry goes to ``agents.json``.
    ``max_samples`` caps every agent's claimed sample count (None: the first accepted
    registration pins it, if at or below ``sample_ceiling``; None there: any count)."""
    from takfl.federation_data import client_id  # torch: not for `status` and other probes

    check_client_count(cfg)
    _check_positive("max_samples", max_samples)
    _check_positive("sample_ceiling", sample_ceiling)
    records = []
    for p in cfg.prototypes:
        for k in range(p.clients):
            aid = client_id(p.name, k)
            path = secret_path(out_dir, aid)
            secret = write_secret_file(path, generate_secret(), overwrite=True)
            records.append(
                RegistryEntry(
                    agent_id=aid,
                    prototype=p.name,
                    profile=p.profile,
                    secret_hex=secret.hex(),
                    max_samples=max_samples,
                    sample_ceiling=sample_ceiling,
                )
            )
    save_registry(out_dir / REGISTRY_FILE, records)
    return records


def reprovision_agent(
    out_dir: Path, agent_id: str, *, max_samples: int | None = None
) -> RegistryEntry:
    """Re-provision one agent of the registry in ``out_dir`` (a replacement device, or one
    whose data grew): a new secret in ``secrets/<id>.secret`` and the allowance
    ``max_samples`` (None: open, pinned by its next first registration under the
    ceiling); every other agent stays as it was. The old secret no longer verifies."""
    _check_positive("max_samples", max_samples)
    path = out_dir / REGISTRY_FILE
    records = load_registry(path)
    old = records.get(agent_id)
    if old is None:
        raise RegistryError(f"{agent_id!r} is not in {path}; known: {', '.join(sorted(records))}")
    secret = write_secret_file(secret_path(out_dir, agent_id), generate_secret(), overwrite=True)
    records[agent_id] = replace(old, secret_hex=secret.hex(), max_samples=max_samples)
    save_registry(path, list(records.values()))
    return records[agent_id]
