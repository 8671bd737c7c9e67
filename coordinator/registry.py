"""The coordinator's registry of known agents: id, prototype, profile, secret and
sample allowance.

Written by ``takfl-coordinator provision`` (mode 0600), read by ``serve``; an
agent that is not in it, or claims another prototype, is refused. The allowance
(``max_samples``, the largest sample count, i.e. FedAvg weight, the agent may
claim) is set at provisioning (``--max-samples``) or, when left open, pinned by
the agent's first accepted registration and written back here.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from takfl.config import FederationConfig
from takfl.federation_data import client_id
from takfl.files import atomic_write_text
from takfl.secret_files import write_secret_file
from takfl.wire.signing import generate_secret

REGISTRY_FILE = "agents.json"
SECRETS_DIR = "secrets"  # <agent id>.secret for every agent, beside the registry


class RegistryError(ValueError):
    """The agent registry is missing or malformed."""


MAX_CLIENTS = 100_000  # agents one provisioning run writes secrets for


@dataclass(frozen=True, kw_only=True)
class RegistryEntry:
    agent_id: str
    prototype: str
    profile: str
    secret_hex: str
    max_samples: int | None = None  # None: pinned by the first accepted registration

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
        n = a.max_samples
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise RegistryError(f"{path}: {a.agent_id}: max_samples must be a positive integer")
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


def provision_agents(
    cfg: FederationConfig, out_dir: Path, *, max_samples: int | None = None
) -> list[RegistryEntry]:
    """One agent per configured client (ids like ``M-003``), each with its own secret file
    ``secrets/<id>.secret`` to copy onto that device; the registry goes to ``agents.json``.
    ``max_samples`` caps every agent's claimed sample count (None: the first accepted
    registration pins it)."""
    check_client_count(cfg)
    if max_samples is not None and max_samples < 1:
        raise RegistryError(f"max_samples must be at least 1, got {max_samples}")
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
                )
            )
    save_registry(out_dir / REGISTRY_FILE, records)
    return records
