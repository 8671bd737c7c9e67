"""Builds the engine's inputs from a federation config (shared by simulate and serve)."""

from __future__ import annotations

import torch

from coordinator.engine import ServerData
from takfl.config import FederationConfig, prototype_model
from takfl.config.base import ModelSpec
from takfl.federation_data import FederationData


def pick_device(name: str | None) -> torch.device:
    """``cuda`` when present unless told otherwise; an error if CUDA is asked for but absent."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def prototype_models(cfg: FederationConfig) -> dict[str, ModelSpec]:
    return {p.name: prototype_model(cfg, p.name) for p in cfg.prototypes}


def server_data(data: FederationData, device: torch.device) -> ServerData:
    """Public, validation and test tensors moved once to the compute device."""
    return ServerData(
        public_x=data.public_x.to(device),
        val_x=data.val_x.to(device),
        val_y=data.val_y.to(device),
        test_x=data.test_x.to(device),
        test_y=data.test_y.to(device),
        num_classes=data.num_classes,
        input_shape=data.input_shape,
    )
