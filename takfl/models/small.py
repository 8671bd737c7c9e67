"""Models sized for 8x8 single-channel digits: the tiers of the bundled demo.

Capacities differ by roughly an order of magnitude each, as device tiers do:
``mlp_digits`` (microcontroller/phone class), ``cnn_digits_small``
(Raspberry Pi class), ``cnn_digits_large`` (workstation class).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from takfl.models.registry import register


class MLP(nn.Module):
    def __init__(
        self, num_classes: int, input_shape: tuple[int, int, int], width: int, depth: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        in_dim = math.prod(input_shape)
        for _ in range(depth):
            layers += [nn.Linear(in_dim, width), nn.ReLU()]
            in_dim = width
        layers.append(nn.Linear(in_dim, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.net(x)


class SmallCNN(nn.Module):
    """Two 3x3 conv stages (each conv-BN-ReLU, then 2x2 max-pool) and a linear head."""

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, int, int],
        widths: tuple[int, int],
        hidden: int,
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(widths[0], widths[1], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[1]),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = widths[1] * (h // 4) * (w // 4)
        if flat == 0:
            raise ValueError(f"input {h}x{w} is too small for two 2x2 pools")
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.head(self.features(x))


@register("mlp_digits", family="mlp", default_input_shape=(1, 8, 8))
def mlp_digits(
    num_classes: int, input_shape: tuple[int, int, int], width: int = 32, depth: int = 1
) -> nn.Module:
    return MLP(num_classes, input_shape, width=width, depth=depth)


@register("cnn_digits_small", family="cnn", default_input_shape=(1, 8, 8))
def cnn_digits_small(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    return SmallCNN(num_classes, input_shape, widths=(16, 32), hidden=64)


@register("cnn_digits_large", family="cnn", default_input_shape=(1, 8, 8))
def cnn_digits_large(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    return SmallCNN(num_classes, input_shape, widths=(64, 128), hidden=256)
