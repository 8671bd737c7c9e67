"""``takfl-coordinator``: the workstation side of a takfl-edge federation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from coordinator.engine import RoundResult
from takfl.config import (
    ALGORITHMS,
    ConfigError,
    FederationConfig,
    LambdaSpec,
    load_federation,
)

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
    rounds: int = typer.Option(None, min=1, help="Rounds (default: config's)."),
    alpha: float = typer.Option(None, min=1e-6, help="Dirichlet alpha override."),
    compression: str = typer.Option(
        None,
        help="Apply the wire codec to updates: fp32|fp16|"
        "int8, or 'profile' (each device profile's own).",
    ),
    lambda_strategy: str = typer.Option(
        None, "--lambda-strategy", help="fixed|search|learned|unsupervised override."
    ),
    data_dir: str = typer.Option(None, help="Folder of CIFAR batches / .npz / image folder."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto (CUDA when present)."),
    out: Path = typer.Option(Path("runs/simulate"), help="Output folder."),
) -> None:
    """Simulate a federation in process and compare algorithms like the paper's Table 1."""
    from coordinator.inputs import pick_device
    from coordinator.simulate import SimulationSpec, run_simulation

    cfg = load_config_or_exit(config)
    algs = [a.strip() for a in (compare or algorithm or cfg.algorithm.name).split(",") if a.strip()]
    bad = [a for a in algs if a not in ALGORITHMS]
    if bad:
        raise fail(f"unknown algorithm(s) {bad}; choose from {', '.join(ALGORITHMS)}")
    if compression not in (None, "fp32", "fp16", "int8", "profile"):
        raise fail(f"unknown compression {compression!r}; use fp32, fp16, int8 or profile")
    if lambda_strategy is not None:
        if lambda_strategy not in ("fixed", "search", "learned", "unsupervised"):
            raise fail(f"unknown lambda strategy {lambda_strategy!r}")
        cfg.algorithm.lambdas = LambdaSpec.model_validate(
            {**cfg.algorithm.lambdas.model_dump(), "strategy": lambda_strategy}
        )
    try:
        dev = pick_device(device)
    except ValueError as e:
        raise fail(str(e)) from None
    spec = SimulationSpec(algs, seeds, rounds, alpha, compression, data_dir)
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
        except (ValueError, OSError) as e:
            raise fail(str(e)) from e
    console.print(results_table(results, f"final test accuracy (%), {seeds} seed(s)"))
    console.print(
        f"metrics: {out / 'metrics.jsonl'}  results: {out / 'results.json'}  "
        f"plot: {out / 'accuracy.png'}"
    )


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


@app.command()
def serve(
    config: str = typer.Option(..., help="Bundled federation name or path to a YAML file."),
    broker: str = typer.Option(
        "embedded", help="'embedded' (loopback amqtt) or mqtt[s]://user:pass@host:port"
    ),
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
    metrics_addr: str = typer.Option("0.0.0.0", help="Address the metrics endpoint binds to."),
) -> None:
    """Run TAKFL rounds with real agents over MQTT, writing the run directory."""
    from coordinator.inputs import pick_device
    from coordinator.registry import RegistryError
    from coordinator.serve import ServeSettings
    from coordinator.serve import serve as run_serve
    from coordinator.store import RunStoreError
    from takfl.mqtt.client import MqttConnectError

    cfg = load_config_or_exit(config)
    settings = ServeSettings(
        broker=broker,
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
        metrics_addr=metrics_addr,
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
    except (RegistryError, RunStoreError, MqttConnectError, ValueError, OSError) as e:
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
        "default: what the agent's first registration says.",
    ),
    mosquitto_host: str = typer.Option(
        "127.0.0.1", help="Address the central Mosquitto listens on (0.0.0.0: every interface)."
    ),
    site: list[str] = typer.Option(
        None,
        help="A site broker bridged to the central one: NAME (every agent) or "
        "NAME:PATTERN[,PATTERN] of agent ids (e.g. lab:S-*,M-000). Repeatable.",
    ),
    site_port: int = typer.Option(1883, help="Port the site brokers listen on."),
    site_host: str = typer.Option("0.0.0.0", help="Address the site brokers listen on."),
    central_host: str = typer.Option(
        None, help="Address at which site brokers reach the central broker (with --site)."
    ),
) -> None:
    """Create a secret per agent, the registry, and optionally a Mosquitto configuration
    (and site brokers bridged to it)."""
    from coordinator.broker.site import SiteError, SiteSpec
    from coordinator.registry import RegistryError
    from coordinator.serve import provision as do_provision
    from coordinator.serve import provision_sites

    cfg = load_config_or_exit(config)
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
            mosquitto_host=mosquitto_host,
        )
    except RegistryError as e:
        raise fail(str(e)) from None
    console.print(
        f"{len(records)} agents: registry {out / 'agents.json'}, secrets in "
        f"{out / 'secrets'} (copy each to its device, mode 600)"
    )
    if files is not None:
        console.print(
            f"mosquitto: mosquitto -c {files.conf}  (passwords of takfl-coordinator and "
            f"of the read-only takfl-monitor for status in {out}/*.password)"
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


@app.command()
def status(
    run_dir: Path = typer.Option(None, help="Read the state of this run directory."),
    broker: str = typer.Option(None, help="Also ask this broker which agents are online."),
    fleet: str = typer.Option(None, help="Fleet name (default: the run's config name)."),
    listen: float = typer.Option(2.0, help="Seconds to collect retained presence messages."),
    watch: bool = typer.Option(
        False, help="Live table of the run's agents, round, phase and stragglers (--run-dir)."
    ),
    interval: float = typer.Option(2.0, min=0.1, help="Seconds between refreshes of --watch."),
    times: int = typer.Option(None, min=1, help="Stop --watch after this many refreshes."),
) -> None:
    """Agents (online/offline, prototype, last seen), round, phase, per-prototype accuracy."""
    from coordinator.status import broker_presence, run_status

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
    if broker is not None:
        if fleet is None:
            raise fail("--fleet is needed with --broker when no --run-dir is given")
        try:
            agents_seen = broker_presence(broker, fleet, listen)
        except (ValueError, OSError) as e:
            raise fail(str(e)) from None
        table = Table(title=f"agents of fleet {fleet!r} seen on {broker}")
        for col in ("agent", "prototype", "state", "last seen"):
            table.add_column(col)
        for aid, info in sorted(agents_seen.items()):
            table.add_row(
                aid, info.get("prototype", "?"), info.get("state", "?"), info.get("last_seen", "?")
            )
        console.print(table)


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


@app.command()
def demo(
    config: str = typer.Option("digits", help="Bundled federation name or path."),
    rounds: int = typer.Option(3, min=1, help="Rounds to run."),
    run_dir: Path = typer.Option(Path("runs/demo"), help="Run directory (replaced)."),
    deadline: float = typer.Option(90.0, help="Seconds a round waits for its updates."),
    export: bool = typer.Option(False, help="Export the final models (adds a few minutes)."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto."),
    report: bool = typer.Option(False, help="Write the field-trial report at the end."),
) -> None:
    """Embedded broker + coordinator + one agent process per client, a few real rounds."""
    from coordinator.demo import DemoSettings, run_demo
    from coordinator.inputs import pick_device

    cfg = load_config_or_exit(config)
    rows: list[tuple[int, dict[str, float]]] = []
    t0 = __import__("time").monotonic()
    run_demo(
        cfg,
        run_dir,
        DemoSettings(config, rounds, deadline, export=export),
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
