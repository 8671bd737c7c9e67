"""``takfl-coordinator``: the workstation side of a takfl-edge federation."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from takfl.config import ALGORITHMS, ConfigError, load_federation

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Coordinator of a takfl-edge federation (TAKFL across device tiers).")
console = Console()


def fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def load_config_or_exit(name: str):  # type: ignore[no-untyped-def]
    try:
        return load_federation(name)
    except ConfigError as e:
        console.print(f"[red]{e.source} is not a valid federation config:[/red]")
        for p in e.problems:
            console.print(f"  [red]-[/red] {p}")
        raise typer.Exit(2) from None


def results_table(results: dict, title: str) -> Table:  # type: ignore[type-arg]
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
    algorithm: str = typer.Option(None, help=f"One of {', '.join(ALGORITHMS)} (default: config's)."),
    compare: str = typer.Option(None, help="Comma-separated algorithms run on identical partitions."),
    seeds: int = typer.Option(1, min=1, help="Independent seeds (partition, init, sampling)."),
    rounds: int = typer.Option(None, min=1, help="Rounds (default: config's)."),
    alpha: float = typer.Option(None, min=1e-6, help="Dirichlet alpha override."),
    compression: str = typer.Option(None, help="Apply the wire codec to updates: fp32|fp16|int8."),
    lambda_strategy: str = typer.Option(None, "--lambda-strategy",
                                        help="fixed|search|learned|unsupervised override."),
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
    if compression not in (None, "fp32", "fp16", "int8"):
        raise fail(f"unknown compression {compression!r}; use fp32, fp16 or int8")
    if lambda_strategy is not None:
        if lambda_strategy not in ("fixed", "search", "learned", "unsupervised"):
            raise fail(f"unknown lambda strategy {lambda_strategy!r}")
        cfg.algorithm.lambdas.strategy = lambda_strategy  # type: ignore[assignment]
    try:
        dev = pick_device(device)
    except ValueError as e:
        raise fail(str(e)) from None
    spec = SimulationSpec(algs, seeds, rounds, alpha, compression, data_dir)
    n_rounds = rounds or cfg.rounds
    console.print(f"[bold]{cfg.name}[/bold]: {', '.join(algs)} x {seeds} seed(s) x {n_rounds} "
                  f"rounds on {dev}; writing to {out}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[acc]}"),
                  console=console) as progress:
        bar = progress.add_task("rounds", total=len(algs) * seeds * n_rounds, acc="")

        def on_round(alg: str, seed: int, res) -> None:  # type: ignore[no-untyped-def]
            acc = " ".join(f"{p}={a:.1f}" for p, a in res.accuracy.items())
            progress.update(bar, advance=1, description=f"{alg} seed {seed} round {res.round_id}",
                            acc=acc)

        try:
            results = run_simulation(cfg, spec, out, dev, on_round)
        except (ValueError, OSError) as e:
            raise fail(str(e)) from e
    console.print(results_table(results, f"final test accuracy (%), {seeds} seed(s)"))
    console.print(f"metrics: {out / 'metrics.jsonl'}  results: {out / 'results.json'}  "
                  f"plot: {out / 'accuracy.png'}")


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


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
