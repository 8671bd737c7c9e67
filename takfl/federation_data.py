"""The data of a federation: one partition, shared by coordinator, agents and exporters.

Every party derives it from the config and the seed, so an agent started with
``--demo-shard K`` holds exactly the shard the simulation gives client K.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from takfl.config.federation import FederationConfig
from takfl.data import (
    Partition,
    PrototypeShare,
    TensorDataset,
    load_dataset,
    make_partition,
)


def client_id(prototype: str, index: int) -> str:
    """Stable name of a prototype's k-th client, e.g. ``M-003``."""
    return f"{prototype}-{index:03d}"


@dataclass(kw_only=True)
class FederationData:
    """Tensors on CPU. ``clients[cid] = (prototype, x, y)``."""

    pool: TensorDataset
    partition: Partition
    public_x: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    clients: dict[str, tuple[str, torch.Tensor, torch.Tensor]]

    @property
    def num_classes(self) -> int:
        return self.pool.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.pool.input_shape


def build_federation_data(
    cfg: FederationConfig,
    seed: int = 0,
    data_dir: str | Path | None = None,
    alpha: float | None = None,
) -> FederationData:
    """Load the config's data set and partition it with ``cfg.partition.seed + seed``."""
    d = cfg.data
    root = data_dir if data_dir is not None else d.data_dir
    pool = load_dataset(d.dataset, root, "train", d.layout)
    test_size = 0 if d.test_from_split else d.test_size
    public_size = 0 if d.public_dataset else d.public_size
    shares = [PrototypeShare(p.name, p.data_ratio, p.clients) for p in cfg.prototypes]
    part = make_partition(
        pool.y.numpy(),
        shares,
        test_size=test_size,
        validation_size=d.validation_size,
        public_size=public_size,
        alpha=alpha if alpha is not None else cfg.partition.alpha,
        min_per_client=cfg.partition.min_per_client,
        seed=cfg.partition.seed + seed,
    )

    def take(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(idx, dtype=torch.long)
        return pool.x[t], pool.y[t]

    if d.test_from_split:
        test = load_dataset(d.dataset, root, "test", d.layout)
        test_x, test_y = test.x, test.y
    else:
        test_x, test_y = take(part.test)
    if d.public_dataset:
        public = load_dataset(d.public_dataset, d.public_data_dir or root, "train", d.layout)
        gen = torch.Generator().manual_seed(cfg.partition.seed + seed)
        pick = torch.randperm(len(public), generator=gen)[: d.public_size]
        public_x = public.x[pick]
    else:
        public_x = take(part.public)[0]
    val_x, val_y = take(part.validation)
    clients = {}
    for proto, shards in part.private.items():
        for k, idx in enumerate(shards):
            x, y = take(idx)
            clients[client_id(proto, k)] = (proto, x, y)
    return FederationData(
        pool=pool,
        partition=part,
        public_x=public_x,
        val_x=val_x,
        val_y=val_y,
        test_x=test_x,
        test_y=test_y,
        clients=clients,
    )
