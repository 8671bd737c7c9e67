"""A federation run (in-process clients, FedAvg) that SIGKILLs itself at a chosen write.

    python -m tests.crash_run RUN_DIR ROUNDS POINT [--resume]

POINT names the store write after which the process kills itself (the first time it
happens in the last round): ``save_global``, ``write_state`` (the state that commits the
round), ``commit_metrics``, or ``none``. Used by the crash-consistency tests: a real
SIGKILL, at a precise place, with no hook in the code under test.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from coordinator.engine import RoundPolicy
from coordinator.service import FederationRun, ServeOptions
from coordinator.store import RunStore
from coordinator.transport.inprocess import InProcessTransport, VirtualClient
from takfl.config import FederationConfig, load_federation, prototype_training
from takfl.federation_data import build_federation_data


def small_config() -> FederationConfig:
    cfg = load_federation("digits")
    cfg.algorithm.name = "fedavg"
    for p, clients in zip(cfg.prototypes, (2, 2, 1), strict=True):
        p.clients, p.sample_rate = clients, 1.0
    return cfg


def make_run(root: Path, rounds: int, resume: bool) -> FederationRun:
    cfg = small_config()
    data = build_federation_data(cfg, 0)
    clients = [
        VirtualClient(client_id=cid, prototype=p, x=x, y=y, training=prototype_training(cfg, p))
        for cid, (p, x, y) in data.clients.items()
    ]
    tr = InProcessTransport(clients, num_classes=data.num_classes, input_shape=data.input_shape)
    return FederationRun(
        cfg,
        data,
        tr,
        RunStore(root),
        torch.device("cpu"),
        ServeOptions(rounds=rounds, resume=resume, policy=RoundPolicy(deadline_s=30)),
    )


ROUND_OF = {  # the round a store call writes, from its first argument
    "save_global": lambda meta: meta.round,
    "write_state": lambda state: state.get("round"),
    "commit_metrics": lambda round_id: round_id,
}


def kill_after(store: RunStore, method: str, last_round: int) -> None:
    """SIGKILL this process right after ``store.method`` first writes ``last_round``."""
    original = getattr(store, method)
    round_of = ROUND_OF[method]

    def wrapped(first: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(first, *args, **kwargs)
        if round_of(first) == last_round:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(store, method, wrapped)


def main() -> None:
    root, rounds, point = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    run = make_run(root, rounds, "--resume" in sys.argv)
    if point != "none":
        kill_after(run.store, point, rounds)
    run.run()


if __name__ == "__main__":
    main()
