"""``takfl-coordinator``: the workstation side of a takfl-edge federation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from coordinator.registry import DEFAULT_SAMPLE_CEILING
from takfl.config import (
    ALGORITHMS,
    LAMBDA_STRATEGIES,
    ConfigError,
    FederationConfig,
    load_federation,
)
from takfl.method_names import CLIPPING_MODES, PAPER_ALGORITHMS, PRIVACY_MODES
from takfl.run_layout import METRICS_FILE, PLOT_FILE, RESULTS_FILE

if TYPE_CHECKING:
    from coordinator.engine import RoundResult
    from coordinator.metrics import MetricsTls

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Coordinator of a takfl-edge federation (TAKFL across device tiers).",
)
console = Console()


def fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def load_config_or_exit(name: str) -> FederationConfig:
    try:
        return load_federation(name)
    except ConfigError as e:
        console.print(f"[red]{e.source} is not a valid federation config:[/red]")
        for p in e.problems:
            console.print(f"  [red]-[/red] {p}")
        raise typer.Exit(2) from None


# The privacy options of simulate and serve (each overrides the config's privacy section).
PRIVACY_OPTION = typer.Option(None, "--privacy", help=f"Privacy mode: {'|'.join(PRIVACY_MODES)}.")
EPSILON_OPTION = typer.Option(
    None,
    "--epsilon",
    min=0.0,
    help="central-dp, secagg-dp: the budget epsilon (the run stops before it).",
)
DELTA_OPTION = typer.Option(None, "--delta", min=0.0, max=1.0, help="central-dp, secagg-dp: delta.")
NOISE_OPTION = typer.Option(
    None,
    "--noise-multiplier",
    min=0.0,
    help="central-dp, secagg-dp: noise std / clip norm (default: calibrated to the budget).",
)
CLIP_NORM_OPTION = typer.Option(
    None,
    "--clip-norm",
    min=0.0,
    help="L2 bound of each update: central-dp (first, if adaptive), secagg, secagg-dp.",
)
CLIPPING_OPTION = typer.Option(
    None, "--clipping", help=f"central-dp clipping: {'|'.join(CLIPPING_MODES)}."
)


def apply_privacy(cfg: FederationConfig, overrides: dict[str, Any]) -> FederationConfig:
    """``cfg`` with the command line's privacy options, or exit with the reason."""
    from coordinator.privacy import with_privacy

    try:
        return with_privacy(cfg, overrides)
    except ValueError as e:
        raise fail(f"invalid privacy options: {e}") from None


BUDGET_RULES = ("adaptive", "fixed")


def with_budget_rule(cfg: FederationConfig, rule: str | None) -> FederationConfig:
    """``cfg`` with ``--budget`` applied to its distillation (unchanged when None)."""
    if rule is None:
        return cfg
    if rule not in BUDGET_RULES:
        raise fail(f"unknown --budget {rule!r}: one of {', '.join(BUDGET_RULES)}")
    distill = cfg.algorithm.distill.model_copy(update={"adaptive": rule == "adaptive"})
    algorithm = cfg.algorithm.model_copy(update={"distill": distill})
    return cfg.model_copy(update={"algorithm": algorithm})


def check_privacy(cfg: FederationConfig, algorithms: list[Any]) -> None:
    """Exit with every reason an algorithm (or the aggregation) cannot run in the config's
    privacy mode."""
    from takfl.privacy.modes import PrivacyConfigError, resolve_privacy
    from takfl.robust import make_aggregator

    aggregator = make_aggregator(cfg.aggregation)
    for algo in algorithms:
        try:
            resolve_privacy(cfg.privacy, algo, aggregator)
        except PrivacyConfigError as e:
            raise fail(str(e)) from None


def results_table(results: dict[str, dict[str, dict[str, Any]]], title: str) -> Table:
    """Algorithms as rows, prototypes (and their average) as columns: mean ± std."""
    protos = list(next(iter(results.values())).keys()) if results else []
    table = Table(title=title)
    table.add_column("algorithm")
    for p in protos:
        table.add_column(f"{p}", justify="right")
    table.add_column("average", justify="right")
    for alg, by_proto in results.items():
        cells = [f"{by_proto[p]['mean']:.2f} ± {by_proto[p]['std']:.2f}" for p in protos]
        avg = sum(by_proto[p]["mean"] for p in protos) / max(len(protos), 1)
        table.add_row(alg, *cells, f"{avg:.2f}")
    return table


@app.command()
def simulate(
    config: str = typer.Option("digits", help="Bundled federation name or path to a YAML file."),
    algorithm: str = typer.Option(
        None, help=f"One of {', '.join(ALGORITHMS)} (default: config's)."
    ),
    compare: str = typer.Option(
        None, help="Comma-separated algorithms run on identical partitions."
    ),
    seeds: int = typer.Option(1, min=1, help="Independent seeds (partition, init, sampling)."),
    first_seed: int = typer.Option(
        0, min=0, help="First seed, so seeds can run as separate processes and be merged."
    ),
    rounds: int = typer.Option(None, min=1, help="Rounds (default: config's)."),
    alpha: float = typer.Option(None, min=1e-6, help="Dirichlet alpha override."),
    compression: str = typer.Option(
        None,
        help="Apply a wire codec to updates: fp32|fp16|int8|topk-int8|topk-fp16|sign1|"
        "rot2|rot3|rot4 with optional settings (topk-int8:density=0.02, "
        "sign1:block=128,density=0.8), one per prototype (S=sign1:density=0.6;M=sign1;L=fp16), "
        "or 'profile' (each device profile's own). Codecs with error feedback keep each "
        "client's residual across rounds.",
    ),
    downstream: str = typer.Option(
        None,
        help="Send each client its global model as a codec's delta against the model it "
        "holds (the same codec forms as --compression, or 'profile'); default: the full "
        "model every round.",
    ),
    lambda_strategy: str = typer.Option(
        None, "--lambda-strategy", help=f"Override: {'|'.join(LAMBDA_STRATEGIES)}."
    ),
    validation: bool = typer.Option(
        None,
        "--validation/--no-validation",
        help="Give labelled validation to every method, or withhold it from every method "
        "(default: the config's algorithm.validation).",
    ),
    data_dir: str = typer.Option(None, help="Folder of CIFAR batches / .npz / image folder."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto (CUDA when present)."),
    threads: int = typer.Option(
        None,
        min=1,
        help="torch CPU threads (default: torch's). On a busy machine 1 is much faster: "
        "small models' kernels do not amortise thread hand-offs.",
    ),
    vectorise: bool = typer.Option(
        None,
        "--vectorise/--no-vectorise",
        help="Train a prototype's sampled clients together (vmap on the device) instead of "
        "one by one; same result within float rounding. Default: automatic (on CUDA; on a "
        "CPU for models up to 50k parameters).",
    ),
    budget: str = typer.Option(
        None,
        help="Distillation budget rule for every method: 'adaptive' (each distillation stops "
        "when its student stops improving, the configured budget its cap) or 'fixed' (every "
        "distillation runs the whole budget). Default: the config's algorithm.distill.adaptive.",
    ),
    out: Path = typer.Option(Path("runs/simulate"), help="Output folder."),
    privacy: str = PRIVACY_OPTION,
    epsilon: float = EPSILON_OPTION,
    delta: float = DELTA_OPTION,
    noise_multiplier: float = NOISE_OPTION,
    clip_norm: float = CLIP_NORM_OPTION,
    clipping: str = CLIPPING_OPTION,
) -> None:
    """Simulate a federation in process and compare algorithms like the paper's Table 1."""
    from coordinator.inputs import pick_device
    from coordinator.privacy import PrivacyBudgetExceeded
    from coordinator.simulate import PROFILE, SimulationSpec, resolve_compression, run_simulation
    from takfl.algorithms import AlgorithmError, resolve_algorithm
    from takfl.wire.codec_names import CodecNameError

    cfg = apply_privacy(
        load_config_or_exit(config),
        {
            "mode": privacy,
            "epsilon": epsilon,
            "delta": delta,
            "noise_multiplier": noise_multiplier,
            "clip_norm": clip_norm,
            "clipping": clipping,
        },
    )
    cfg = with_budget_rule(cfg, budget)
    algs = [a.strip() for a in (compare or algorithm or cfg.algorithm.name).split(",") if a.strip()]
    for choice, down in ((compression, False), (downstream, True)):
        if choice is None:
            continue
        try:
            resolve_compression(cfg, choice, downstream=down)
        except CodecNameError as e:
            raise fail(f"{e} (or {PROFILE!r})") from None
    try:
        resolved = [
            resolve_algorithm(
                cfg.algorithm, a, lambda_strategy=lambda_strategy, validation=validation
            )
            for a in algs
        ]
    except AlgorithmError as e:
        raise fail(str(e)) from None
    check_privacy(cfg, resolved)
    try:
        dev = pick_device(device)
    except ValueError as e:
        raise fail(str(e)) from None
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    spec = SimulationSpec(
        algorithms=resolved,
        seeds=seeds,
        first_seed=first_seed,
        rounds=rounds,
        alpha=alpha,
        compression=compression,
        downstream=downstream,
        data_dir=data_dir,
        vectorise=vectorise,
    )
    n_rounds = rounds or cfg.rounds
    console.print(
        f"[bold]{cfg.name}[/bold]: {', '.join(algs)} x {seeds} seed(s) x {n_rounds} "
        f"rounds on {dev}; writing to {out}"
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[acc]}"),
        console=console,
    ) as progress:
        bar = progress.add_task("rounds", total=len(algs) * seeds * n_rounds, acc="")

        def on_round(alg: str, seed: int, res: RoundResult) -> None:
            acc = " ".join(f"{p}={a:.1f}" for p, a in res.accuracy.items())
            progress.update(
                bar, advance=1, description=f"{alg} seed {seed} round {res.round_id}", acc=acc
            )

        try:
            results = run_simulation(cfg, spec, out, dev, on_round)
        except (ValueError, OSError, PrivacyBudgetExceeded) as e:
            raise fail(str(e)) from e
    console.print(results_table(results, f"final test accuracy (%), {seeds} seed(s)"))
    console.print(
        f"metrics: {out / METRICS_FILE}  results: {out / RESULTS_FILE}  plot: {out / PLOT_FILE}"
    )


@app.command()
def reproduce(
    settings: str = typer.Option(
        "cifar10-homo",
        help="Comma-separated bundled settings (cifar10-homo, cifar10-homo-dir01, "
        "cifar10-hetero, cifar100-homo, cifar100-hetero) or YAML paths.",
    ),
    data_dir: str = typer.Option(None, help="Folder of the CIFAR python batches."),
    public_data_dir: str = typer.Option(
        None, help="Folder of the public set when it is not CIFAR (an image folder)."
    ),
    algorithms: str = typer.Option(",".join(PAPER_ALGORITHMS), help="Comma-separated."),
    seeds: int = typer.Option(1, min=1),
    rounds: int = typer.Option(None, min=1, help="Rounds (default: the setting's, 60)."),
    paper_table: Path = typer.Option(None, help="The paper's values (default: bundled)."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto (CUDA when present)."),
    threads: int = typer.Option(None, min=1, help="torch CPU threads."),
    out: Path = typer.Option(Path("runs/reproduce"), help="Output folder."),
) -> None:
    """Run the paper's comparison on its settings and print the paper's numbers beside ours."""
    from coordinator.inputs import pick_device
    from coordinator.reproduce import comparison_rows, load_paper_table, run_setting
    from takfl.algorithms import AlgorithmError

    try:
        paper = load_paper_table(paper_table)
        dev = pick_device(device)
    except ValueError as e:
        raise fail(str(e)) from None
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    algs = [a.strip() for a in algorithms.split(",") if a.strip()]
    console.print(f"paper values: {paper.source} ({paper.table or 'table not transcribed'})")
    for name in [s.strip() for s in settings.split(",") if s.strip()]:
        cfg = load_config_or_exit(name)
        if public_data_dir is not None:
            cfg.data.public_data_dir = public_data_dir
        console.print(f"[bold]{cfg.name}[/bold] on {dev}: {', '.join(algs)} x {seeds} seed(s)")
        try:
            results = run_setting(
                cfg,
                algorithms=algs,
                seeds=seeds,
                rounds=rounds,
                data_dir=data_dir,
                out=out / cfg.name,
                device=dev,
            )
        except AlgorithmError as e:
            raise fail(str(e)) from None
        except (ValueError, OSError) as e:
            raise fail(str(e)) from e
        tiers = [p.name for p in cfg.prototypes]
        table = Table(title=f"{cfg.name}: final test accuracy (%), ours (paper)")
        for col in ["algorithm", *tiers, "average"]:
            table.add_column(col, justify="left" if col == "algorithm" else "right")
        for row in comparison_rows(cfg.name, tiers, results, paper):
            table.add_row(*row)
        console.print(table)
        console.print(f"results: {out / cfg.name / RESULTS_FILE}")


@app.command("compare-runs")
def compare_runs(
    runs: list[Path] = typer.Argument(..., help="simulate output folders (e.g. one per seed)."),
    lambdas_of: str = typer.Option("takfl", help="Algorithm whose lambdas per round are plotted."),
    plot: Path = typer.Option(None, help="Where to write the lambda plot (PNG)."),
) -> None:
    """Merge runs: final-round accuracy (mean ± std over seeds) and lambdas per round."""
    from coordinator.compare import (
        final_accuracy,
        lambdas_per_round,
        plot_lambdas,
        read_metrics,
        scale_counts,
    )

    try:
        records = read_metrics(runs)
    except (ValueError, OSError) as e:
        raise fail(str(e)) from None
    results = final_accuracy(records)
    seeds = sorted(
        {s for by_tier in results.values() for c in by_tier.values() for s in c["seeds"]}
    )
    console.print(results_table(results, f"final test accuracy (%), complete seeds {seeds}"))
    counts = scale_counts(records)
    if counts:
        console.print(f"takfl-scaled: scale chosen {counts} (student-rounds)")
    if plot is not None:
        lams = lambdas_per_round(records, lambdas_of)
        if not lams:
            raise fail(f"no lambdas recorded for {lambdas_of!r} in these runs")
        plot_lambdas(lams, plot, f"{lambdas_of}: lambda per round")
        console.print(f"plot: {plot}")


@app.command()
def partition(
    config: str = typer.Option("digits", help="Bundled federation name or path."),
    seed: int = typer.Option(0, help="Seed offset added to the config's partition seed."),
    data_dir: str = typer.Option(None, help="Data folder for CIFAR / npz / image folders."),
) -> None:
    """Print the partition: samples per class for every set and client."""
    from takfl.data import partition_summary
    from takfl.federation_data import build_federation_data

    cfg = load_config_or_exit(config)
    try:
        data = build_federation_data(cfg, seed, data_dir)
    except ValueError as e:
        raise fail(str(e)) from e
    table = Table(title=f"{cfg.name} partition (seed {cfg.partition.seed + seed})")
    table.add_column("set / client")
    table.add_column("total", justify="right")
    for name in data.pool.class_names:
        table.add_column(name, justify="right")
    for row in partition_summary(data.partition, data.pool.y.numpy(), data.num_classes):
        table.add_row(*row)
    console.print(table)


def _round_printer(
    table_rows: list[tuple[int, dict[str, float]]],
) -> Callable[[RoundResult], None]:
    def on_round(res: RoundResult) -> None:
        table_rows.append((res.round_id, res.accuracy))
        acc = "  ".join(f"{p}={a:.1f}%" for p, a in res.accuracy.items())
        got = " ".join(f"{p}:{res.received[p]}/{res.sampled[p]}" for p in res.received)
        console.print(
            f"[bold]round {res.round_id}[/bold] accuracy {acc}  updates {got}  "
            f"({sum(res.timings.values()):.1f}s)"
        )

    return on_round


def accuracy_table(rows: list[tuple[int, dict[str, float]]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("round", justify="right")
    protos = list(rows[0][1]) if rows else []
    for p in protos:
        table.add_column(p, justify="right")
    for r, acc in rows:
        table.add_row(str(r), *[f"{acc[p]:.2f}" for p in protos])
    return table


def _metrics_tls(cert: str | None, key: str | None, client_ca: str | None) -> MetricsTls | None:
    """The metrics endpoint's TLS from the serve options (None: plain HTTP)."""
    if cert is None and key is None and client_ca is None:
        return None
    if cert is None or key is None:
        raise fail("metrics over HTTPS need both --metrics-cert-file and --metrics-key-file")
    from coordinator.metrics import MetricsTls

    return MetricsTls(cert, key, client_ca)


@app.command()
def serve(
    config: str = typer.Option(..., help="Bundled federation name or path to a YAML file."),
    broker: str = typer.Option(
        "embedded", help="'embedded' (loopback amqtt) or mqtt[s]://USER@host:port"
    ),
    password_file: Path = typer.Option(
        None,
        help="File holding the broker password (mode 600); else $TAKFL_BROKER_PASSWORD. "
        "Never put it in --broker: the process list shows it to every user.",
    ),
    ca_file: str = typer.Option(None, help="mqtts: CA certificate that signed the broker's."),
    cert_file: str = typer.Option(None, help="mqtts: client certificate (mutual TLS)."),
    key_file: str = typer.Option(None, help="mqtts: key of the client certificate."),
    port: int = typer.Option(1883, help="Port of the embedded broker."),
    run_dir: Path = typer.Option(Path("runs/serve"), help="Run directory."),
    agents: Path = typer.Option(None, help="Agent registry (default RUN_DIR/agents.json)."),
    resume: bool = typer.Option(False, help="Continue the run in RUN_DIR after a stop."),
    rounds: int = typer.Option(None, min=1, help="Rounds (default: config's)."),
    deadline: float = typer.Option(120.0, help="Seconds a round waits for its updates."),
    quorum: float = typer.Option(
        1.0, min=0.0, max=1.0, help="Fraction of each prototype's sampled clients needed."
    ),
    max_wait: float = typer.Option(600.0, help="Past the deadline, wait this long for a quorum."),
    fleet: str = typer.Option(None, help="Fleet name in the topics (default: config name)."),
    wait_all: float = typer.Option(
        60.0,
        help="Before round 1, wait this long for every "
        "provisioned agent; then start with those online.",
    ),
    device: str = typer.Option("auto", help="cpu, cuda, or auto."),
    export: bool = typer.Option(True, help="Export every prototype at the end."),
    metrics_port: int = typer.Option(
        None, min=0, max=65535, help="Serve Prometheus metrics on this port (/metrics)."
    ),
    metrics_bind: str = typer.Option(
        "127.0.0.1",
        "--metrics-bind",
        "--metrics-addr",
        help="Address the metrics endpoint binds to; any other than loopback needs TLS "
        "(--metrics-cert-file, --metrics-key-file) or --metrics-plaintext.",
    ),
    metrics_cert_file: str = typer.Option(None, help="Metrics over HTTPS: its certificate."),
    metrics_key_file: str = typer.Option(None, help="Metrics over HTTPS: its key."),
    metrics_client_ca: str = typer.Option(
        None, help="Metrics over HTTPS: scrapers must present a certificate from this CA."
    ),
    metrics_plaintext: bool = typer.Option(
        False, help="Allow plain, unauthenticated HTTP metrics on a non-loopback address."
    ),
    privacy: str = PRIVACY_OPTION,
    epsilon: float = EPSILON_OPTION,
    delta: float = DELTA_OPTION,
    noise_multiplier: float = NOISE_OPTION,
    clip_norm: float = CLIP_NORM_OPTION,
    clipping: str = CLIPPING_OPTION,
) -> None:
    """Run TAKFL rounds with real agents over MQTT, writing the run directory."""
    from coordinator.inputs import pick_device
    from coordinator.privacy import PrivacyBudgetExceeded
    from coordinator.registry import RegistryError
    from coordinator.serve import ServeSettings
    from coordinator.serve import serve as run_serve
    from coordinator.store import RunStoreError
    from takfl.algorithms import AlgorithmError, resolve_algorithm
    from takfl.mqtt.client import MqttConnectError
    from takfl.mqtt.url import parse_broker_url, read_password

    cfg = apply_privacy(
        load_config_or_exit(config),
        {
            "mode": privacy,
            "epsilon": epsilon,
            "delta": delta,
            "noise_multiplier": noise_multiplier,
            "clip_norm": clip_norm,
            "clipping": clipping,
        },
    )
    try:
        check_privacy(cfg, [resolve_algorithm(cfg.algorithm)])
    except AlgorithmError as e:
        raise fail(str(e)) from None
    metrics_tls = _metrics_tls(metrics_cert_file, metrics_key_file, metrics_client_ca)
    if metrics_port is not None:
        from coordinator.metrics import endpoint_problem

        problem = endpoint_problem(metrics_bind, metrics_tls, metrics_plaintext)
        if problem is not None:
            raise fail(problem)
    try:
        password = None if broker == "embedded" else read_password(password_file)
        if broker != "embedded":  # refuse a bad URL or TLS option before anything starts
            parse_broker_url(broker, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
    except ValueError as e:
        raise fail(str(e)) from None
    settings = ServeSettings(
        broker=broker,
        password=password,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        embedded_port=port,
        fleet=fleet,
        rounds=rounds,
        resume=resume,
        agents_file=agents,
        deadline_s=deadline,
        quorum=quorum,
        max_wait_s=max_wait,
        wait_all_s=wait_all,
        export=export,
        metrics_port=metrics_port,
        metrics_bind=metrics_bind,
        metrics_tls=metrics_tls,
        metrics_plaintext=metrics_plaintext,
    )
    rows: list[tuple[int, dict[str, float]]] = []
    try:
        run_serve(
            cfg,
            run_dir,
            settings,
            pick_device(device),
            on_round=_round_printer(rows),
            report=lambda m: console.print(m),
        )
    except (
        RegistryError,
        RunStoreError,
        MqttConnectError,
        PrivacyBudgetExceeded,
        ValueError,
        OSError,
    ) as e:
        raise fail(str(e)) from None
    if rows:
        console.print(accuracy_table(rows, f"{cfg.name}: test accuracy (%) per prototype"))


@app.command()
def provision(
    config: str = typer.Option(..., help="Bundled federation name or path."),
    out: Path = typer.Option(..., help="Folder for agents.json, secrets/ and mosquitto/."),
    mosquitto_port: int = typer.Option(None, help="Also write a Mosquitto config for this port."),
    mosquitto_user: str = typer.Option(
        None,
        help="Account mosquitto drops to when started as "
        "root (must be able to read the generated files).",
    ),
    fleet: str = typer.Option(None, help="Fleet name (default: config name)."),
    max_samples: int = typer.Option(
        None,
        min=1,
        help="Most training samples any agent may claim (its FedAvg weight); "
        "default: what the agent's first registration says, up to --sample-ceiling.",
    ),
    sample_ceiling: int = typer.Option(
        DEFAULT_SAMPLE_CEILING,
        min=1,
        help="Fleet-wide: a first registration above it is refused, not pinned as the "
        "agent's allowance (agents without --max-samples).",
    ),
    agent: str = typer.Option(
        None,
        help="Re-provision this one agent of the registry in --out (a replacement device, "
        "or one whose data grew): a new secret and the allowance --max-samples; "
        "restart serve with --resume to use it.",
    ),
    tls: bool = typer.Option(
        False, help="Also create a fleet CA, a server certificate and a TLS listener."
    ),
    tls_host: list[str] = typer.Option(
        None, help="Host name or IP address agents use to reach the broker (repeatable)."
    ),
    tls_port: int = typer.Option(8883, help="Port of the TLS listener."),
    mosquitto_host: str = typer.Option(
        "127.0.0.1", help="Address the central Mosquitto listens on (0.0.0.0: every interface)."
    ),
    service_port: int = typer.Option(
        None,
        help="Port of Mosquitto's service listener, where status monitors and the release "
        "service log in (default: --mosquitto-port + 1).",
    ),
    listen: list[str] = typer.Option(
        None,
        help="Address the TLS listener binds (repeatable; 0.0.0.0: every interface). "
        "Default: the --tls-host values that are IP addresses, else --mosquitto-host.",
    ),
    site: list[str] = typer.Option(
        None,
        help="A site broker bridged to the central one: NAME (every agent) or "
        "NAME:PATTERN[,PATTERN] of agent ids (e.g. lab:S-*,M-000). Repeatable.",
    ),
    site_port: int = typer.Option(1883, help="Port the site brokers listen on."),
    site_host: str = typer.Option(
        "127.0.0.1", help="Address the site brokers listen on (0.0.0.0: every interface)."
    ),
    central_host: str = typer.Option(
        None, help="Address at which site brokers reach the central broker (with --site)."
    ),
) -> None:
    """Create a secret per agent, the registry, and optionally a Mosquitto configuration
    (and site brokers bridged to it)."""
    from coordinator.broker.errors import BrokerStartError
    from coordinator.broker.site import SiteError, SiteSpec
    from coordinator.broker.tls import tls_listen_addresses
    from coordinator.registry import RegistryError
    from coordinator.serve import TLS_DIR, provision_sites
    from coordinator.serve import provision as do_provision

    cfg = load_config_or_exit(config)
    if agent is not None:
        _reprovision(out, agent, max_samples)
        return
    if tls and not tls_host:
        raise fail("--tls needs at least one --tls-host (the name or address agents connect to)")
    if tls_host and not tls:
        raise fail("--tls-host is only used with --tls")
    if listen and not tls:
        raise fail("--listen sets where the TLS listener binds: use it with --tls")
    specs = []
    if site:
        if mosquitto_port is None:
            raise fail("--site needs the central Mosquitto: give --mosquitto-port too")
        if central_host is None:
            raise fail("--site needs --central-host: the address sites reach the central broker at")
        try:
            specs = [SiteSpec.parse(s) for s in site]
        except SiteError as e:
            raise fail(str(e)) from None
    try:
        records, files, _ = do_provision(
            cfg,
            out,
            fleet=fleet,
            mosquitto_port=mosquitto_port,
            mosquitto_user=mosquitto_user,
            max_samples=max_samples,
            sample_ceiling=sample_ceiling,
            tls_hosts=list(tls_host) if tls else None,
            tls_port=tls_port,
            mosquitto_host=mosquitto_host,
            listen=list(listen) if listen else None,
            service_port=service_port,
        )
    except (RegistryError, ValueError, BrokerStartError, OSError) as e:
        raise fail(str(e)) from None
    console.print(
        f"{len(records)} agents: registry {out / 'agents.json'}, secrets in "
        f"{out / 'secrets'} (copy each to its device, mode 600)"
    )
    console.print(
        f"releases: signed with {out / 'release-key.pem'} (keep it private); copy "
        f"{out / 'root.json'} to every device (it verifies releases with it)"
    )
    if files is not None:
        console.print(
            f"mosquitto: mosquitto -c {files.conf}  (passwords of takfl-coordinator, "
            f"of the read-only takfl-monitor for status and of takfl-release for release "
            f"in {out}/*.password); agents and the coordinator connect to port "
            f"{files.port}, status and release to the service port {files.service_port}"
        )
    if tls:
        console.print(
            f"TLS: listener on port {tls_port} for {', '.join(tls_host)}, bound to "
            f"{', '.join(tls_listen_addresses(list(tls_host), listen, mosquitto_host))}; copy "
            f"{out / TLS_DIR / 'ca.crt'} to every device (takfl-agent run --ca-file) and keep "
            f"{out / TLS_DIR / 'ca.key'} private"
        )
    if specs and files is not None:
        try:
            site_files = provision_sites(
                cfg,
                out,
                files,
                specs,
                central_host=central_host,
                port=site_port,
                host=site_host,
                fleet=fleet,
                run_as=mosquitto_user,
            )
        except (SiteError, ValueError) as e:
            raise fail(str(e)) from None
        for sf in site_files:
            console.print(
                f"site {sf.site}: mosquitto -c {sf.broker.conf}  ({len(sf.agents)} agents "
                f"connect to it on port {site_port}; it bridges to {central_host}:{files.port} "
                f"as {sf.bridge_user})"
            )


def _reprovision(out: Path, agent: str, max_samples: int | None) -> None:
    from coordinator.registry import RegistryError, secret_path
    from coordinator.serve import reprovision

    try:
        record = reprovision(out, agent, max_samples=max_samples)
    except (RegistryError, ValueError, OSError) as e:
        raise fail(str(e)) from None
    allowance = record.max_samples or f"open, up to {record.sample_ceiling}"
    console.print(
        f"{agent}: new secret {secret_path(out, agent)} (copy it to the replacement device; "
        f"the old one no longer verifies), allowance {allowance}; restart serve with "
        "--resume (and send Mosquitto SIGHUP) to use it"
    )


@app.command()
def status(
    run_dir: Path = typer.Option(None, help="Read the state of this run directory."),
    broker: str = typer.Option(
        None, help="Also ask this broker which agents are online (mqtt[s]://USER@host:port)."
    ),
    password_file: Path = typer.Option(
        None, help="File holding the broker password; else $TAKFL_BROKER_PASSWORD."
    ),
    ca_file: str = typer.Option(None, help="mqtts: CA certificate that signed the broker's."),
    fleet: str = typer.Option(None, help="Fleet name (default: the run's config name)."),
    listen: float = typer.Option(
        2.0,
        help="At most this many seconds to collect retained presence messages (it stops "
        "as soon as they stop arriving).",
    ),
    watch: bool = typer.Option(
        False, help="Live table of the run's agents, round, phase and stragglers (--run-dir)."
    ),
    interval: float = typer.Option(2.0, min=0.1, help="Seconds between refreshes of --watch."),
    times: int = typer.Option(None, min=1, help="Stop --watch after this many refreshes."),
) -> None:
    """Agents (online/offline, prototype, last seen), round, phase, per-prototype accuracy,
    and each release's state per tier with the devices' inference latency."""
    from coordinator.status import broker_presence, run_status
    from takfl.mqtt.url import read_password

    if run_dir is None and broker is None:
        raise fail("give --run-dir, --broker, or both")
    if watch:
        if run_dir is None:
            raise fail("--watch reads a run directory: give --run-dir")
        from coordinator.watch import watch_run

        watch_run(run_dir, interval, times, console)
        return
    if run_dir is not None:
        try:
            state, fleet_name = run_status(run_dir)
        except (OSError, ValueError) as e:
            raise fail(str(e)) from None
        fleet = fleet or fleet_name
        table = Table(title=f"run {run_dir}")
        table.add_column("field")
        table.add_column("value")
        for k, v in state.items():
            table.add_row(k, str(v))
        console.print(table)
        _print_releases(run_dir)
    if broker is not None:
        if fleet is None:
            raise fail("--fleet is needed with --broker when no --run-dir is given")
        try:
            agents_seen = broker_presence(
                broker, fleet, listen, password=read_password(password_file), ca_file=ca_file
            )
        except (ValueError, OSError) as e:
            raise fail(str(e)) from None
        _print_agents(agents_seen, f"agents of fleet {fleet!r} seen on {broker}")


def _print_agents(seen: dict[str, dict[str, str]], title: str) -> None:
    """The agents seen: a table, or past ``RICH_ROWS`` agents a summary per prototype and
    the list as plain text (a rich table of thousands of rows takes seconds to render)."""
    from coordinator.status import (
        AGENT_COLUMNS,
        RICH_ROWS,
        agent_rows,
        plain_table,
        presence_summary,
    )

    rows = agent_rows(seen)
    if len(rows) <= RICH_ROWS:
        table = Table(title=title)
        for col in AGENT_COLUMNS:
            table.add_column(col)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    summary = Table(title=f"{title}: {len(rows)}")
    for col in ("prototype", "online", "offline", "serving"):
        summary.add_column(col, justify="left" if col == "prototype" else "right")
    for proto, counts in presence_summary(seen).items():
        summary.add_row(proto, *(str(counts.get(k, 0)) for k in ("online", "offline", "serving")))
    console.print(summary)
    typer.echo(plain_table(rows))


@app.command()
def report(
    run: Path = typer.Argument(..., help="Run directory (serve, demo or simulate output)."),
    out: Path = typer.Option(None, help="HTML file to write (default RUN/report.html)."),
) -> None:
    """Field-trial report: one self-contained HTML page plus report.json."""
    from coordinator.report import ReportError, write_report

    if not run.is_dir():
        raise fail(f"{run} is not a directory; give a run directory")
    try:
        html_path, json_path = write_report(run, out)
    except (ReportError, OSError, ValueError, KeyError) as e:
        raise fail(f"cannot report on {run}: {e}") from None
    console.print(f"report: {html_path}  data: {json_path}")


def _print_releases(run_dir: Path) -> None:
    """Each release's state per tier and the devices' latency per hardware class."""
    from coordinator.deploy.tables import release_tables

    # piped or captured output keeps whole columns (as takfl-export's tables do)
    out = console if console.is_terminal else Console(width=max(console.width, 160))
    try:
        for item in release_tables(run_dir):
            out.print(item)
    except ValueError as e:  # a damaged rollout record: say so, show the rest
        console.print(f"[yellow]releases: {e}[/yellow]")


def _plain(line: str) -> None:
    """Print a progress line as it is (device-reported details are not markup)."""
    console.print(line, markup=False, highlight=False)


def _release_done(rollouts: list[Any], run: Path) -> None:
    """Print the release tables; exit 1 unless every rollout completed."""
    _print_releases(run)
    unfinished = [f"{r.id} {r.state.value}" for r in rollouts if r.state.value != "completed"]
    if unfinished:
        console.print(f"[yellow]not completed:[/yellow] {', '.join(unfinished)}")
        raise typer.Exit(1)


_BROKER_HELP = "'embedded' (loopback amqtt) or mqtt://takfl-release@host:port (mqtts:// with TLS)"
_PASSWORD_HELP = "File holding the release login's password (provision writes release.password)."


@app.command()
def release(
    run: Path = typer.Argument(..., help="Run directory (serve or demo output)."),
    prototype: list[str] = typer.Option(None, help="Prototype to release (repeatable)."),
    all_prototypes: bool = typer.Option(False, "--all", help="Release every prototype."),
    round_: int = typer.Option(
        None, "--round", min=0, help="Round whose models to release (default: the run's last)."
    ),
    stages: str = typer.Option("10%,50%,100%", help="Cumulative fractions of each tier."),
    abort_above: str = typer.Option("20%", help="Halt and roll back past this failure rate."),
    device_timeout: float = typer.Option(600.0, min=1, help="Seconds a device has to install."),
    timeout: float = typer.Option(3600.0, min=1, help="Seconds the whole rollout may take."),
    release_key: Path = typer.Option(None, help="Release key (default: beside agents.json)."),
    broker: str = typer.Option("embedded", help=_BROKER_HELP),
    password_file: Path = typer.Option(None, help=_PASSWORD_HELP),
    ca_file: str = typer.Option(None, help="mqtts: CA certificate that signed the broker's."),
    cert_file: str = typer.Option(None, help="mqtts: client certificate (mutual TLS)."),
    key_file: str = typer.Option(None, help="mqtts: key of the client certificate."),
    port: int = typer.Option(1883, help="Port of the embedded broker."),
    fleet: str = typer.Option(None, help="Fleet name in the topics (default: config name)."),
    agents: Path = typer.Option(None, help="Agent registry (default RUN/agents.json)."),
) -> None:
    """Release each prototype's export of a round to its devices, in stages: signed
    metadata, artifacts over the chunked path, halt and roll back past --abort-above.
    Exits 1 unless every rollout completed."""
    from coordinator.broker.errors import BrokerStartError
    from coordinator.deploy.command import release as run_release
    from coordinator.deploy.command import release_settings
    from coordinator.deploy.stages import parse_fraction, parse_stages
    from coordinator.store import RunStoreError
    from takfl.mqtt.client import MqttConnectError

    if bool(prototype) == all_prototypes:
        raise fail("give --prototype P (repeatable) or --all")
    try:
        settings = release_settings(
            broker=broker,
            password_file=password_file,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            embedded_port=port,
            fleet=fleet,
            agents_file=agents,
            release_key=release_key,
            round=round_,
            stages=parse_stages(stages),
            abort_above=parse_fraction(abort_above, "--abort-above"),
            device_timeout_s=device_timeout,
            timeout_s=timeout,
        )
        names = None if all_prototypes else prototype
        rollouts = run_release(run, names, settings, report=_plain)
    except ImportError as e:
        raise fail(f"a release needs the export toolchain (takfl-edge[export]): {e}") from None
    except (BrokerStartError, MqttConnectError, RunStoreError, ValueError, OSError) as e:
        raise fail(str(e)) from None
    _release_done(rollouts, run)


@app.command()
def rollback(
    run: Path = typer.Argument(..., help="Run directory the release was made from."),
    prototype: str = typer.Option(..., help="Prototype to roll back."),
    to: int = typer.Option(..., min=1, help="Release version to reinstate."),
    device_timeout: float = typer.Option(600.0, min=1, help="Seconds a device has to install."),
    timeout: float = typer.Option(3600.0, min=1, help="Seconds the rollback may take."),
    release_key: Path = typer.Option(None, help="Release key (default: beside agents.json)."),
    broker: str = typer.Option("embedded", help=_BROKER_HELP),
    password_file: Path = typer.Option(None, help=_PASSWORD_HELP),
    ca_file: str = typer.Option(None, help="mqtts: CA certificate that signed the broker's."),
    cert_file: str = typer.Option(None, help="mqtts: client certificate (mutual TLS)."),
    key_file: str = typer.Option(None, help="mqtts: key of the client certificate."),
    port: int = typer.Option(1883, help="Port of the embedded broker."),
    fleet: str = typer.Option(None, help="Fleet name in the topics (default: config name)."),
    agents: Path = typer.Option(None, help="Agent registry (default RUN/agents.json)."),
) -> None:
    """Reinstate an earlier release on every device of a prototype: a newer signed
    version that names it (devices refuse plain older versions). Exits 1 unless it
    completed."""
    from coordinator.broker.errors import BrokerStartError
    from coordinator.deploy.command import release_settings
    from coordinator.deploy.command import rollback as run_rollback
    from coordinator.store import RunStoreError
    from takfl.mqtt.client import MqttConnectError

    try:
        settings = release_settings(
            broker=broker,
            password_file=password_file,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            embedded_port=port,
            fleet=fleet,
            agents_file=agents,
            release_key=release_key,
            device_timeout_s=device_timeout,
            timeout_s=timeout,
        )
        rollout = run_rollback(run, prototype, to, settings, report=_plain)
    except (BrokerStartError, MqttConnectError, RunStoreError, ValueError, OSError) as e:
        raise fail(str(e)) from None
    _release_done([rollout], run)


@app.command()
def demo(
    config: str = typer.Option("digits", help="Bundled federation name or path."),
    rounds: int = typer.Option(3, min=1, help="Rounds to run."),
    run_dir: Path = typer.Option(Path("runs/demo"), help="Run directory (replaced)."),
    deadline: float = typer.Option(90.0, help="Seconds a round waits for its updates."),
    export: bool = typer.Option(False, help="Export the final models (adds a few minutes)."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto."),
    report: bool = typer.Option(False, help="Write the field-trial report at the end."),
    release: bool = typer.Option(
        True,
        help="At the end, release every tier's model to its agents (staged, signed, health "
        "checked) and ask each agent's local endpoint for predictions.",
    ),
) -> None:
    """Embedded broker + coordinator + one agent process per client, a few real rounds,
    then a release of the final models to the agents, which serve predictions."""
    from coordinator.demo import DemoSettings, run_demo
    from coordinator.inputs import pick_device

    cfg = load_config_or_exit(config)
    rows: list[tuple[int, dict[str, float]]] = []
    t0 = __import__("time").monotonic()
    run_demo(
        cfg,
        run_dir,
        DemoSettings(
            config_name=config, rounds=rounds, deadline_s=deadline, export=export, release=release
        ),
        pick_device(device),
        on_round=_round_printer(rows),
        report=lambda m: console.print(m),
    )
    console.print(accuracy_table(rows, f"{cfg.name} demo over MQTT: test accuracy (%)"))
    console.print(
        f"finished in {__import__('time').monotonic() - t0:.0f}s; run directory "
        f"{run_dir} (state.json, models/, metrics.jsonl, telemetry.jsonl, agents/*.log)"
    )
    if report:
        from coordinator.report import write_report

        html_path, _ = write_report(run_dir)
        console.print(f"report: {html_path} (open it in a browser; report.json beside it)")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The embedded broker's own log is noisy under load (take-overs, internal retries).
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    logging.getLogger("transitions").setLevel(logging.CRITICAL)
    app()


if __name__ == "__main__":
    main()
