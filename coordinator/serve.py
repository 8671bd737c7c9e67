"""``takfl-coordinator serve``: a federation of real agents over MQTT.

Wires the pieces together: the broker (embedded or given), the agent registry,
the MQTT transport, the resumable federation run, and the export at the end.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from coordinator.broker.acl import BrokerAccess
from coordinator.broker.embedded import EmbeddedBroker
from coordinator.broker.mosquitto import (
    PASSWORDS_NAME,
    MosquittoFiles,
    MosquittoTls,
    set_password,
    write_mosquitto_config,
)
from coordinator.broker.net import LOOPBACK
from coordinator.broker.site import SiteFiles, SiteSpec, write_site_config
from coordinator.broker.tls import make_fleet_tls, tls_listen_addresses
from coordinator.deploy.service import RELEASE_USER
from coordinator.engine import RoundPolicy, RoundResult
from coordinator.observe import FleetObserver, Observers
from coordinator.registry import (
    DEFAULT_SAMPLE_CEILING,
    REGISTRY_FILE,
    AllowanceBook,
    RegistryEntry,
    load_registry,
    provision_agents,
    reprovision_agent,
)
from coordinator.service import FederationRun, ServeOptions, update_bounds
from coordinator.store import RunStore, RunStoreError
from coordinator.telemetry_log import TelemetryRecorder, TelemetryWriter, plausibility
from coordinator.transport.mqtt import MqttTransport, TransportPolicy
from takfl.config import FederationConfig, prototype_profile
from takfl.config.loader import prototype_model, prototype_training
from takfl.federation_data import FederationData, build_federation_data
from takfl.files import atomic_write_text
from takfl.models import build_model
from takfl.mqtt.client import MqttSettings
from takfl.mqtt.credentials import mqtt_password
from takfl.mqtt.url import parse_broker_url
from takfl.release.keys import KEY_FILE, generate_release_key
from takfl.run_layout import exports_dir
from takfl.wire import validation
from takfl.wire.envelope import new_run_id
from takfl.wire.messages import InputNorm

if TYPE_CHECKING:
    from coordinator.metrics import MetricsTls

log = logging.getLogger(__name__)
TLS_DIR = "tls"  # provision's CA and server certificate
MOSQUITTO_DIR = "mosquitto"  # provision's Mosquitto configuration
COORDINATOR_USER = "takfl-coordinator"
MONITOR_USER = "takfl-monitor"  # read-only, for takfl-coordinator status


@dataclass(kw_only=True)
class ServeSettings:
    broker: str = "embedded"  # "embedded" or mqtt[s]://[user@]host:port
    password: str | None = field(default=None, repr=False)  # broker password (file or env)
    ca_file: str | None = None  # mqtts: CA that signed the broker's certificate
    cert_file: str | None = None  # mqtts: client certificate and key (mutual TLS)
    key_file: str | None = None
    embedded_port: int = 1883
    fleet: str | None = None  # default: the config's name
    rounds: int | None = None
    seed: int = 0
    resume: bool = False
    agents_file: Path | None = None  # default: RUN/agents.json
    deadline_s: float = 120.0
    quorum: float = 1.0
    max_wait_s: float = 600.0
    wait_all_s: float = 60.0  # wait this long for every provisioned agent before round 1...
    wait_agents_s: float = 600.0  # ...and at most this long for one agent per prototype
    export: bool = True
    metrics_port: int | None = None  # serve Prometheus metrics on this port (0: any free)
    metrics_bind: str = LOOPBACK  # another address needs metrics_tls or metrics_plaintext
    metrics_tls: MetricsTls | None = None
    metrics_plaintext: bool = False


def embedded_access(
    fleet: str,
    registry: dict[str, RegistryEntry],
    coordinator_password: str,
    release_password: str | None = None,
) -> BrokerAccess:
    """Logins of the embedded broker: the coordinator, every provisioned agent with the
    password derived from its secret (what ``takfl-agent run`` uses), and with
    ``release_password`` the release service (``RELEASE_USER``), under the fleet's ACL."""
    return BrokerAccess.for_fleet(
        fleet,
        (COORDINATOR_USER, coordinator_password),
        {a: mqtt_password(r.secret) for a, r in registry.items()},
        release=None if release_password is None else (RELEASE_USER, release_password),
    )


@contextmanager
def broker_for(
    settings: ServeSettings, fleet: str, registry: dict[str, RegistryEntry]
) -> Iterator[MqttSettings]:
    """Start the embedded broker when asked (its coordinator password lives only in this
    process); otherwise parse the URL."""
    if settings.broker == "embedded":
        password = secrets.token_hex(16)
        broker = EmbeddedBroker(
            settings.embedded_port, access=embedded_access(fleet, registry, password)
        ).start()
        log.info("embedded broker on %s:%d", broker.host, broker.port)
        try:
            yield MqttSettings(
                host=broker.host, port=broker.port, username=COORDINATOR_USER, password=password
            )
        finally:
            broker.stop()
    else:
        yield parse_broker_url(
            settings.broker,
            password=settings.password,
            ca_file=settings.ca_file,
            cert_file=settings.cert_file,
            key_file=settings.key_file,
        )


def wire_registry(records: dict[str, RegistryEntry]) -> dict[str, validation.AgentRecord]:
    return {
        a: validation.AgentRecord(
            agent_id=a,
            prototype=r.prototype,
            secret=r.secret,
            max_samples=r.max_samples,
            sample_ceiling=r.sample_ceiling,
        )
        for a, r in records.items()
    }


def training_programs(
    cfg: FederationConfig,
    num_classes: int,
    input_shape: tuple[int, int, int],
    report: Callable[[str], None] = print,
) -> dict[str, bytes]:
    """An ExecuTorch training program for every prototype whose device profile trains
    through ExecuTorch (the same program all rounds; agents load each round's weights)."""
    programs: dict[str, bytes] = {}
    for proto in cfg.prototypes:
        training = prototype_training(cfg, proto.name)
        if training.backend != "executorch":
            continue
        from export.executorch_export import checked_training_program

        spec = prototype_model(cfg, proto.name)
        torch.manual_seed(0)
        model = build_model(spec.builder, num_classes, input_shape, **spec.args)
        program, parity = checked_training_program(model, input_shape, training)
        programs[proto.name] = program
        report(
            f"prototype {proto.name}: ExecuTorch training program {len(program) / 1024:.0f} KiB, "
            f"{parity.steps} SGD steps within {parity.max_param_diff:.1e} of torch"
        )
    return programs


def transport_policy(
    cfg: FederationConfig, programs: dict[str, bytes] | None = None
) -> TransportPolicy:
    """Each prototype's agents encode updates as their device profile says; updates are
    bounded as the config's intake section says; ``programs``: the training programs
    offered with the tasks of each prototype; under secagg every round is secure."""
    comms = {p.name: prototype_profile(cfg, p.name).comms for p in cfg.prototypes}
    return TransportPolicy(
        comms_by_prototype=comms,
        bounds=update_bounds(cfg),
        programs=programs or {},
        privacy=cfg.privacy,
    )


def provision(
    cfg: FederationConfig,
    out_dir: Path,
    *,
    fleet: str | None = None,
    mosquitto_port: int | None = None,
    mosquitto_user: str | None = None,
    max_samples: int | None = None,
    sample_ceiling: int | None = DEFAULT_SAMPLE_CEILING,
    tls_hosts: list[str] | None = None,
    tls_port: int = 8883,
    mosquitto_host: str = LOOPBACK,
    listen: list[str] | None = None,
    service_port: int | None = None,
) -> tuple[list[RegistryEntry], MosquittoFiles | None, str]:
    """Secrets and registry for every configured client, and the fleet's release key
    (``release-key.pem`` + ``root.json`` for the devices; made once, kept when it exists);
    optionally a Mosquitto config (password file, per-agent ACL) with fresh passwords of
    the coordinator, the read-only monitor and the release service, and with
    ``tls_hosts`` a fleet CA (``out_dir/tls``), a server certificate for those hosts and
    TLS listeners on ``tls_port`` at the addresses :func:`tls_listen_addresses` gives
    (the wildcard address only if ``listen`` names it; the plain listener is on
    ``mosquitto_host``, loopback unless told otherwise), and a service listener on
    ``service_port`` (default ``mosquitto_port + 1``, on ``mosquitto_host``) where the
    monitor and the release service log in with client ids of their own.
    ``max_samples`` caps each agent's claimed sample count (None: its first registration
    pins it, refused above ``sample_ceiling``)."""
    if tls_hosts and mosquitto_port is None:
        raise ValueError("a TLS listener needs a Mosquitto configuration: add --mosquitto-port")
    tls = None
    if tls_hosts:
        material = make_fleet_tls(out_dir / TLS_DIR, tls_hosts, fleet=fleet or cfg.name)
        tls = MosquittoTls(
            port=tls_port,
            cert_file=str(material.server_cert.resolve()),
            key_file=str(material.server_key.resolve()),
            binds=tls_listen_addresses(tls_hosts, listen, mosquitto_host),
        )
    records = provision_agents(cfg, out_dir, max_samples=max_samples, sample_ceiling=sample_ceiling)
    if not (out_dir / KEY_FILE).exists():  # devices trust it: never replaced here
        generate_release_key(out_dir)
    coord_password = secrets.token_hex(16)
    files = None
    if mosquitto_port is not None:
        monitor_password, release_password = secrets.token_hex(16), secrets.token_hex(16)
        files = write_mosquitto_config(
            out_dir / MOSQUITTO_DIR,
            fleet=fleet or cfg.name,
            port=mosquitto_port,
            host=mosquitto_host,
            coordinator=(COORDINATOR_USER, coord_password),
            agents={r.agent_id: mqtt_password(r.secret) for r in records},
            run_as=mosquitto_user,
            monitor=(MONITOR_USER, monitor_password),
            tls=tls,
            use_tool=False,  # the built-in PBKDF2-SHA512 hasher: one file write, not one per agent
            release=(RELEASE_USER, release_password),
            service_port=service_port if service_port is not None else mosquitto_port + 1,
        )
        for name, password in (
            ("coordinator", coord_password),
            ("monitor", monitor_password),
            ("release", release_password),
        ):
            atomic_write_text(out_dir / f"{name}.password", password + "\n", mode=0o600)
    return records, files, coord_password


def reprovision(out_dir: Path, agent_id: str, *, max_samples: int | None = None) -> RegistryEntry:
    """Re-provision one agent in ``out_dir`` (:func:`coordinator.registry.reprovision_agent`:
    a new secret and allowance) and, when ``out_dir`` holds a Mosquitto configuration,
    its broker password (derived from the new secret). A running ``serve`` reads the
    registry at start: restart it with ``--resume``; Mosquitto reloads on SIGHUP."""
    record = reprovision_agent(out_dir, agent_id, max_samples=max_samples)
    passwords = out_dir / MOSQUITTO_DIR / PASSWORDS_NAME
    if passwords.is_file():
        set_password(passwords, agent_id, mqtt_password(record.secret))
    return record


def provision_sites(
    cfg: FederationConfig,
    out_dir: Path,
    central: MosquittoFiles,
    sites: list[SiteSpec],
    *,
    central_host: str,
    port: int = 1883,
    host: str = LOOPBACK,
    fleet: str | None = None,
    run_as: str | None = None,
) -> list[SiteFiles]:
    """A bridged site broker per site (after :func:`provision` wrote the central one)."""
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"site names must differ: {names}")
    records = load_registry(out_dir / REGISTRY_FILE)
    passwords = {a: mqtt_password(r.secret) for a, r in records.items()}
    return [
        write_site_config(
            out_dir,
            site,
            fleet=fleet or cfg.name,
            central=central,
            central_host=central_host,
            agent_passwords=passwords,
            port=port,
            host=host,
            run_as=run_as,
        )
        for site in sites
    ]


def wait_for_agents(
    transport: MqttTransport,
    cfg: FederationConfig,
    expected: int,
    patience_s: float,
    limit_s: float,
    report: Callable[[str], None],
) -> None:
    """Before the first round: wait up to ``patience_s`` for all ``expected`` provisioned
    agents, then go on with whoever is online once every prototype has at least one, waiting
    at most ``limit_s`` in all. Sampling is then over the agents really there."""
    start = time.monotonic()
    last = ""
    while True:
        online = transport.clients()
        count = sum(len(v) for v in online.values())
        line = ", ".join(
            f"{p.name}: {len(online.get(p.name, []))}/{p.clients}" for p in cfg.prototypes
        )
        if line != last:
            report(f"agents online {line}")
            last = line
        waited = time.monotonic() - start
        every_tier = all(online.get(p.name) for p in cfg.prototypes)
        if count >= expected or (every_tier and waited >= patience_s):
            if count < expected:
                report(
                    f"{expected - count} provisioned agent(s) still offline after "
                    f"{patience_s:.0f}s; starting with those online"
                )
            return
        if waited >= limit_s:
            report("timed out waiting for agents; rounds run with whoever is online")
            return
        time.sleep(0.5)


def run_id_of(store: RunStore) -> str:
    """The run id of the run being resumed (a fresh one for a run from before run ids, or
    when there is no run yet)."""
    state = store.state_if_any()
    return (state.get("run_id") if state is not None else None) or new_run_id()


def input_norm(data: FederationData) -> InputNorm | None:
    """The standardisation of the federation's data, per input channel (None if unknown)."""
    mean, std = list(data.pool.mean), list(data.pool.std)
    if not mean or len(mean) != data.input_shape[0] or len(std) != len(mean):
        return None
    return InputNorm(mean=[float(m) for m in mean], std=[float(s) for s in std])


def serve(
    cfg: FederationConfig,
    run_dir: Path,
    settings: ServeSettings,
    device: torch.device,
    *,
    on_round: Callable[[RoundResult], None] | None = None,
    report: Callable[[str], None] = print,
) -> list[RoundResult]:
    """Run the federation to its last round; export every prototype at the end."""
    store = RunStore(run_dir)
    if store.exists() and not settings.resume:
        raise RunStoreError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another "
            "--run-dir"
        )
    agents_file = settings.agents_file or run_dir / REGISTRY_FILE
    registry = load_registry(agents_file)
    data = build_federation_data(cfg, settings.seed)
    fleet = settings.fleet or cfg.name
    policy = RoundPolicy(settings.deadline_s, settings.quorum, settings.max_wait_s)
    programs = training_programs(cfg, data.num_classes, data.input_shape, report)
    bounds = plausibility(cfg, settings.deadline_s)  # what each tier's devices can report
    telemetry = TelemetryWriter(store)  # off the transport's dispatcher thread
    observers: list[FleetObserver] = [TelemetryRecorder(store, bounds=bounds, writer=telemetry)]
    metrics = None
    if settings.metrics_port is not None:
        from coordinator.metrics import PrometheusMetrics, endpoint_problem

        problem = endpoint_problem(
            settings.metrics_bind, settings.metrics_tls, settings.metrics_plaintext
        )
        if problem is not None:
            raise ValueError(problem)
        metrics = PrometheusMetrics([p.name for p in cfg.prototypes], bounds)
        bound = metrics.serve(settings.metrics_port, settings.metrics_bind, settings.metrics_tls)
        scheme = "http" if settings.metrics_tls is None else "https"
        report(f"Prometheus metrics on {scheme}://{settings.metrics_bind}:{bound}/metrics")
        observers.append(metrics)
    observer = Observers(observers)
    allowances = AllowanceBook(agents_file, registry)
    run_id = run_id_of(store) if settings.resume else new_run_id()
    with broker_for(settings, fleet, registry) as mqtt:
        transport = MqttTransport(
            mqtt,
            fleet,
            wire_registry(registry),
            num_classes=data.num_classes,
            input_shape=data.input_shape,
            policy=transport_policy(cfg, programs),
            on_allowance=allowances.pin,
            observer=observer,
            run_id=run_id,
            input_norm=input_norm(data),
        ).start(timeout=30)
        if not settings.resume:  # the previous run's global models are no longer news
            transport.clear_globals(p.name for p in cfg.prototypes)
        try:
            report(
                f"coordinator on {mqtt.host}:{mqtt.port}, fleet {fleet!r}, "
                f"{len(registry)} provisioned agents, run dir {run_dir}"
            )
            run = FederationRun(
                cfg,
                data,
                transport,
                store,
                device,
                ServeOptions(
                    rounds=settings.rounds or cfg.rounds,
                    seed=settings.seed,
                    resume=settings.resume,
                    policy=policy,
                    run_id=run_id,
                ),
                on_round=on_round,
                on_phase=lambda phase, r: report(f"round {r}: {phase}"),
                registry=transport.registry,
                observer=observer,
            )
            run.prepare()  # a bad run directory fails here, before waiting for agents
            wait_for_agents(
                transport, cfg, len(registry), settings.wait_all_s, settings.wait_agents_s, report
            )
            results = run.run()
            transport.finish()  # late updates are answered "run_finished"
            c = transport.counters
            report(f"updates accepted {c.accepted}, refused {dict(c.refused) or 0}")
        finally:
            transport.close()
            telemetry.close()
            if metrics is not None:
                metrics.close()
    if settings.export:
        export_run_dir(run_dir, report, release_key=agents_file.parent / KEY_FILE)
    return results


def export_run_dir(
    run_dir: Path, report: Callable[[str], None], *, release_key: Path | None = None
) -> None:
    """Export every prototype's final model as its device profile asks, and sign the
    sidecars with ``release_key`` when it exists (needs the export extra; a missing
    toolchain is reported, not fatal)."""
    try:
        from export.metadata import sign_sidecars
        from export.run_export import export_run
    except ImportError as e:
        report(f"skipping export ({e}); install takfl-edge[export] and run takfl-export --run")
        return
    report("exporting every prototype's final model (ONNX / TFLite)...")
    export_run(run_dir)
    if release_key is not None and release_key.is_file():
        from takfl.release.keys import load_signer

        signed = sign_sidecars(exports_dir(run_dir), load_signer(release_key))
        report(f"signed {len(signed)} sidecar(s) with the fleet's release key")
    else:
        report("sidecars not signed: no release key beside the agent registry")
    report(f"exports written under {exports_dir(run_dir)}")
