"""The coordinator's registry of known agents: id, prototype, profile and secret.

Written by ``takfl-coordinator provision`` (mode 0600), read by ``serve``; an
agent that is not in it, or claims another prototype, is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from takfl.config import FederationConfig
from takfl.federation_data import client_id
from takfl.files import atomic_write_text
from takfl.wire.signing import generate_secret, write_secret_file

REGISTRY_FILE = "agents.json"


class RegistryError(ValueError):
    """The agent registry is missing or malformed."""


@dataclass(frozen=True)
class AgentRecord:
    agent_id: str
    prototype: str
    profile: str
    secret_hex: str

    @property
    def secret(self) -> bytes:
        return bytes.fromhex(self.secret_hex)


def save_registry(path: Path, agents: list[AgentRecord]) -> None:
    """Atomically write the registry, readable by its owner only (it holds the secrets)."""
    body = json.dumps({"agents": [asdict(a) for a in agents]}, indent=2)
    atomic_write_text(path, body, mode=0o600)


def load_registry(path: Path) -> dict[str, AgentRecord]:
    try:
        raw = json.loads(path.read_text())
        agents = [AgentRecord(**a) for a in raw["agents"]]
    except FileNotFoundError as e:
        raise RegistryError(f"no agent registry at {path}; run takfl-coordinator provision") from e
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise RegistryError(f"{path} is not an agent registry ({e})") from e
    return {a.agent_id: a for a in agents}


def provision_agents(cfg: FederationConfig, out_dir: Path) -> list[AgentRecord]:
    """One agent per configured client (ids like ``M-003``), each with its own secret file
    ``secrets/<id>.secret`` to copy onto that device; the registry goes to ``agents.json``."""
    records = []
    for p in cfg.prototypes:
        for k in range(p.clients):
            aid = client_id(p.name, k)
            path = out_dir / "secrets" / f"{aid}.secret"
            secret = write_secret_file(path, generate_secret(), overwrite=True)
            records.append(AgentRecord(aid, p.name, p.profile, secret.hex()))
    save_registry(out_dir / REGISTRY_FILE, records)
    return records
