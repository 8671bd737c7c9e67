"""``takfl-coordinator release`` and ``rollback``: from a run directory to rollouts done.

Wires the pieces: the run's config and agent registry, the fleet's release key, the
release store, the builder (:mod:`coordinator.deploy.build`), the rollout records
(:mod:`coordinator.deploy.rollout`), the broker (embedded or given) and the release
service (:mod:`coordinator.deploy.service`). One command at a time per run directory
(the store's lock).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from coordinator.broker.embedded import EmbeddedBroker
from coordinator.deploy.build import release_target, releases_from_run
from coordinator.deploy.control import ReleaseControl
from coordinator.deploy.publish import (
    Published,
    Signing,
    StoredReleases,
    load_signing,
    rollback_release,
)
from coordinator.deploy.rollout import ROLLBACK, Rollout, fleet_release, new_rollout
from coordinator.deploy.service import RELEASE_USER, ReleasePolicy, ReleaseService
from coordinator.deploy.stages import RolloutError
from coordinator.deploy.store import ReleaseStore
from coordinator.registry import REGISTRY_FILE, RegistryEntry, load_registry
from coordinator.serve import embedded_access, wire_registry
from coordinator.store import RunStore
from takfl.config import FederationConfig, load_federation
from takfl.mqtt.client import MqttSettings
from takfl.mqtt.url import parse_broker_url, read_password


@dataclass(kw_only=True)
class ReleaseSettings:
    """How a release or rollback command reaches the devices and rolls out."""

    broker: str = "embedded"  # "embedded" or mqtt[s]://[user@]host:port (user: takfl-release)
    password: str | None = field(default=None, repr=False)  # the release login's password
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    embedded_port: int = 1883
    fleet: str | None = None  # default: the run's config name
    agents_file: Path | None = None  # default: RUN/agents.json
    release_key: Path | None = None  # default: release-key.pem beside the agent registry
    round: int | None = None  # default: the run's last completed round
    stages: tuple[float, ...] = (0.1, 0.5, 1.0)
    abort_above: float = 0.2
    device_timeout_s: float = 600.0
    timeout_s: float = 3600.0  # the whole command
    offer_retry_s: float = 5.0  # send an unanswered offer again after this long
    policy: ReleasePolicy = field(default_factory=ReleasePolicy)


def release_settings(
    *,
    broker: str,
    password_file: Path | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    **values: Any,
) -> ReleaseSettings:
    """Settings from command-line options: the password read from its file (or
    ``$TAKFL_BROKER_PASSWORD``) for a given broker, its URL and TLS options checked
    before anything starts. Raises ValueError naming the bad option."""
    password = None
    if broker != "embedded":
        password = read_password(password_file)
        parse_broker_url(broker, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
    return ReleaseSettings(
        broker=broker,
        password=password,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        **values,
    )


@dataclass(frozen=True, kw_only=True)
class Fleet:
    """What a release command knows about the run and its devices."""

    run: Path
    cfg: FederationConfig
    name: str
    registry: Mapping[str, RegistryEntry]
    registry_file: Path

    def agents(self, prototype: str) -> list[str]:
        ids = sorted(a for a, r in self.registry.items() if r.prototype == prototype)
        if not ids:
            raise RolloutError(f"no provisioned agent of prototype {prototype} to release to")
        return ids


def open_fleet(run_dir: str | Path, settings: ReleaseSettings) -> Fleet:
    run = Path(run_dir)
    cfg = load_federation(RunStore(run).config_path)
    registry_file = settings.agents_file or run / REGISTRY_FILE
    return Fleet(
        run=run,
        cfg=cfg,
        name=settings.fleet or cfg.name,
        registry=load_registry(registry_file),
        registry_file=registry_file,
    )


@contextmanager
def release_broker(settings: ReleaseSettings, fleet: Fleet) -> Iterator[MqttSettings]:
    """The embedded broker (agents connect to it; its release login lives only in this
    process), or the given broker with the release login (username ``takfl-release``
    unless the URL names another)."""
    if settings.broker != "embedded":
        mqtt = parse_broker_url(
            settings.broker,
            password=settings.password,
            ca_file=settings.ca_file,
            cert_file=settings.cert_file,
            key_file=settings.key_file,
        )
        yield mqtt if mqtt.username else replace(mqtt, username=RELEASE_USER)
        return
    password = secrets.token_hex(16)
    access = embedded_access(
        fleet.name, dict(fleet.registry), secrets.token_hex(16), release_password=password
    )
    broker = EmbeddedBroker(settings.embedded_port, access=access).start()
    try:
        yield MqttSettings(
            host=broker.host, port=broker.port, username=RELEASE_USER, password=password
        )
    finally:
        broker.stop()


def load_history(store: ReleaseStore) -> list[Rollout]:
    """The recorded rollouts; any still marked running was left by a command that ended
    early (it held the lock we hold now): it is stopped where it stood, and saved."""
    history = store.load_rollouts()
    stale = [r for r in history if not r.finished]
    for r in stale:
        r.stop("the command that ran it ended before it finished", time.time())
    if stale:
        store.save_rollouts(history)
    return history


def deliver(
    fleet: Fleet,
    store: ReleaseStore,
    history: list[Rollout],
    rollouts: list[Rollout],
    source: StoredReleases,
    settings: ReleaseSettings,
    report: Callable[[str], None],
) -> list[Rollout]:
    """Run ``rollouts`` over MQTT to their end (or the command's timeout), saving the
    records (with every earlier one) after each transition."""
    records = [*history, *rollouts]
    store.save_rollouts(records)
    registry = wire_registry(dict(fleet.registry))
    control = ReleaseControl(
        registry,
        rollouts,
        source,
        save=lambda: store.save_rollouts(records),
        offer_retry_s=settings.offer_retry_s,
    )
    with release_broker(settings, fleet) as mqtt:
        report(f"release service on {mqtt.host}:{mqtt.port} as {mqtt.username}, fleet {fleet.name}")
        service = ReleaseService(
            mqtt, fleet.name, registry, control, policy=settings.policy, report=report
        )
        service.run(settings.timeout_s)
    return rollouts


def release(
    run_dir: str | Path,
    prototypes: Sequence[str] | None,
    settings: ReleaseSettings,
    *,
    report: Callable[[str], None] = print,
) -> list[Rollout]:
    """Build a release of each prototype (all when None) from the run and roll it out
    in stages; the rollout records, finished unless the command's time ran out."""
    fleet = open_fleet(run_dir, settings)
    names = list(prototypes or [p.name for p in fleet.cfg.prototypes])
    agents = {p: fleet.agents(p) for p in names}
    signing = load_signing(fleet.registry_file.parent, fleet.name, key=settings.release_key)
    store = ReleaseStore(fleet.run)
    with store.lock():
        history = load_history(store)
        published = releases_from_run(
            fleet.run, names, signing, round_=settings.round, report=report
        )
        now = time.time()
        rollouts = [
            new_rollout(
                prototype=p,
                version=pub.version,
                agents=agents[p],
                now=now,
                stages=settings.stages,
                abort_above=settings.abort_above,
                device_timeout_s=settings.device_timeout_s,
                previous=fleet_release(history, p),
                artifact_bytes=pub.size,
            )
            for p, pub in published.items()
        ]
        source = _source(fleet, store, signing, list(published.values()))
        return deliver(fleet, store, history, rollouts, source, settings, report)


def rollback(
    run_dir: str | Path,
    prototype: str,
    to_version: int,
    settings: ReleaseSettings,
    *,
    report: Callable[[str], None] = print,
) -> Rollout:
    """Sign a new release of ``prototype`` that reinstates release ``to_version`` and
    offer it to every device of the prototype at once; the rollout record."""
    fleet = open_fleet(run_dir, settings)
    agents = fleet.agents(prototype)
    signing = load_signing(fleet.registry_file.parent, fleet.name, key=settings.release_key)
    store = ReleaseStore(fleet.run)
    with store.lock():
        history = load_history(store)
        chunk = release_target(fleet.cfg, prototype).chunk_size
        made = rollback_release(store, signing, prototype, to_version, chunk)
        report(
            f"release {made.version} of {prototype}: a rollback to release "
            f"{made.release.reinstates} (round {made.release.spec.round})"
        )
        rollout = new_rollout(
            prototype=prototype,
            version=made.version,
            agents=agents,
            now=time.time(),
            action=ROLLBACK,
            reinstates=made.release.reinstates,
            device_timeout_s=settings.device_timeout_s,
            artifact_bytes=made.size,
        )
        source = _source(fleet, store, signing, [made])
        return deliver(fleet, store, history, [rollout], source, settings, report)[0]


def _source(
    fleet: Fleet, store: ReleaseStore, signing: Signing, published: Sequence[Published]
) -> StoredReleases:
    """The releases a command offers: ``published`` and, for their prototypes, stored ones
    and rollbacks, chunked as each prototype's profile says."""
    names = {p.prototype for p in published}
    chunk_sizes = {p: release_target(fleet.cfg, p).chunk_size for p in names}
    return StoredReleases(store, signing, chunk_sizes, published)
