"""The agent's private data: a local folder/file, or a shard of a bundled demo federation."""

from __future__ import annotations

from pathlib import Path

import torch

from takfl.data import DataError, load_image_folder, load_npz
from takfl.federation_data import build_federation_data, client_id


def load_local_data(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``.npz`` file (x, y) or an image folder (root/<class>/<image>)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        ds = load_npz(p)
    elif p.is_dir():
        npz = sorted(p.glob("*.npz"))
        ds = load_npz(npz[0]) if len(npz) == 1 else load_image_folder(p)
    else:
        raise DataError(f"--data {p}: expected a .npz file or an image folder")
    return ds.x, ds.y


def load_demo_shard(
    federation: str, prototype: str, shard: int, seed: int = 0
) -> tuple[str, torch.Tensor, torch.Tensor]:
    """The private data the simulation gives client ``shard`` of ``prototype``.

    Returns (client id, x, y). Raises DataError if that client does not exist.
    """
    from takfl.config import load_federation

    cfg = load_federation(federation)
    data = build_federation_data(cfg, seed)
    cid = client_id(prototype, shard)
    if cid not in data.clients:
        n = cfg.prototype(prototype).clients
        raise DataError(f"--demo-shard {shard}: prototype {prototype} has shards 0..{n - 1}")
    _, x, y = data.clients[cid]
    return cid, x, y
