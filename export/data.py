"""Real inputs for calibration and verification, taken from a federation's data set.

The federation's own partition is rebuilt from its config (the same seeded
split the coordinator uses): the unlabelled public set calibrates int8
models, the test set measures parity and accuracy. Neither has been seen by
local training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from export.common import ExportError
from takfl.config import FederationConfig
from takfl.federation_data import build_federation_data

DEFAULT_CALIBRATION_SAMPLES = 512


@dataclass(kw_only=True)
class ExportData:
    """The real inputs of one export: calibration (Nc, C, H, W) float32 from the public
    set for the int8 quantisers; test_x (Nt, C, H, W) and test_y (Nt,) int64 for parity
    and accuracy."""

    calibration: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    description: str

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.test_x.shape[1:]
        return int(c), int(h), int(w)


def eval_data(
    cfg: FederationConfig,
    *,
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES,
    test_samples: int | None = None,
    data_dir: str | Path | None = None,
) -> ExportData:
    """Public (calibration) and test sets of ``cfg``'s partition.

    Args:
        calibration_samples: at most this many public samples (in partition order).
        test_samples: at most this many test samples; all when None.
        data_dir: overrides the config's data folder (CIFAR batches, .npz file...).
    """
    if calibration_samples < 1:
        raise ExportError(f"calibration_samples must be at least 1, got {calibration_samples}")
    fed = build_federation_data(cfg, data_dir=data_dir)
    if len(fed.public_x) == 0 or len(fed.test_x) == 0:
        raise ExportError(
            f"federation {cfg.name!r} has an empty public or test set; give data.public_size "
            "and data.test_size (or test_from_split) in its config"
        )
    test_n = len(fed.test_x) if test_samples is None else min(test_samples, len(fed.test_x))
    calib = fed.public_x[:calibration_samples]
    return ExportData(
        calibration=calib.float().contiguous(),
        test_x=fed.test_x[:test_n].float().contiguous(),
        test_y=fed.test_y[:test_n].long(),
        num_classes=fed.num_classes,
        description=(
            f"{cfg.data.dataset}: {len(calib)} public samples for calibration, "
            f"{test_n} test samples for parity and accuracy"
        ),
    )
