"""Where an export's model comes from: a prototype checkpoint checked against the model
its federation config gives the prototype (builder, arguments, every tensor's name and
shape), and the prototype's device profile."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from export.common import ExportError
from takfl.checkpoint import CheckpointError, CheckpointMeta, check_state_matches, load_checkpoint
from takfl.config import DeviceProfile, FederationConfig, load_federation, load_profile
from takfl.models import build_model


def _load_config(config: str | Path | FederationConfig) -> tuple[FederationConfig, Path | None]:
    if isinstance(config, FederationConfig):
        return config, None
    return load_federation(config), Path(config) if Path(config).is_file() else None


def prototype_profile(cfg: FederationConfig, name: str, cfg_path: Path | None) -> DeviceProfile:
    """The device profile of prototype ``name`` (paths relative to the config file)."""
    ref = cfg.prototype(name).profile
    if cfg_path is not None and not Path(ref).is_absolute() and (cfg_path.parent / ref).is_file():
        ref = str(cfg_path.parent / ref)
    return load_profile(ref)


def check_against_config(
    state: dict[str, torch.Tensor],
    meta: CheckpointMeta,
    cfg: FederationConfig,
    prototype: str,
    profile: DeviceProfile,
    source: str,
) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint is the model the config gives
    ``prototype`` (builder, arguments and every tensor's name and shape)."""
    spec = cfg.prototype(prototype).model or profile.model
    if meta.prototype != prototype:
        raise CheckpointError(
            f"{source} is a checkpoint of prototype {meta.prototype!r}, not {prototype!r}"
        )
    if meta.builder != spec.builder or json.dumps(meta.builder_args, sort_keys=True) != json.dumps(
        spec.args, sort_keys=True
    ):
        raise CheckpointError(
            f"{source} holds {meta.builder}({meta.builder_args}) but the config gives "
            f"prototype {prototype!r} {spec.builder}({spec.args}); pass the matching config"
        )
    expected = build_model(spec.builder, meta.num_classes, meta.input_shape, **spec.args)
    check_state_matches(expected.state_dict(), state, source)


@dataclass(frozen=True, kw_only=True)
class CheckedCheckpoint:
    """A checkpoint that is the model its federation config gives its prototype."""

    cfg: FederationConfig
    prototype: str
    profile: DeviceProfile
    meta: CheckpointMeta
    model: nn.Module  # the checkpoint's weights, eval mode


def checked_checkpoint(
    checkpoint: str | Path, config: str | Path | FederationConfig, prototype: str | None
) -> CheckedCheckpoint:
    """Load ``checkpoint`` and check it against the config's model for ``prototype`` (the
    checkpoint's own when None).

    Raises:
        CheckpointError: unreadable checkpoint, or not the config's model for the prototype.
        ExportError: unknown prototype.
        ConfigError: the config does not load.
    """
    cfg, cfg_path = _load_config(config)
    state, meta = load_checkpoint(checkpoint)
    name = prototype or meta.prototype
    known = [p.name for p in cfg.prototypes]
    if name not in known:
        raise ExportError(
            f"unknown prototype {name!r}; federation {cfg.name!r} has {', '.join(known)}"
        )
    profile = prototype_profile(cfg, name, cfg_path)
    check_against_config(state, meta, cfg, name, profile, str(checkpoint))
    model = meta.build()
    model.load_state_dict(state)
    return CheckedCheckpoint(
        cfg=cfg, prototype=name, profile=profile, meta=meta, model=model.eval()
    )
