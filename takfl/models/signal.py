"""Models for 1D signals (sensor windows): a tiny MLP, a small 1D CNN and a 1D ResNet.

Signals travel as (B, C, 1, L) tensors, the image layout with height 1, so the
data, wire and export paths stay the same; every model also accepts (B, C, L).
The three are far apart in capacity and in how well they handle a pattern that
may start anywhere in the window (only the convolutional ones are shift-equivariant).
"""

from __future__ import annotations

import torch
from torch import nn

from takfl.models.registry import register

SIGNAL_SHAPE = (3, 1, 64)  # 3-axis sensor, 64 samples


def _as_1d(x: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, L) or (B, C, L) -> (B, C, L)."""
    return x.flatten(2) if x.ndim == 4 else x


def _length(input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 3 or input_shape[1] != 1:
        raise ValueError(f"1D models take input shape (C, 1, L), got {input_shape}")
    return int(input_shape[2])


class SignalMLP(nn.Module):
    """Flatten -> Linear(width) -> ReLU -> Linear(classes)."""

    def __init__(self, num_classes: int, channels: int, length: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * length, width),
            nn.ReLU(),
            nn.Linear(width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, 1, L) -> (B, classes)
        return self.net(_as_1d(x))


def _conv_bn(cin: int, cout: int, k: int, stride: int) -> list[nn.Module]:
    return [nn.Conv1d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm1d(cout), nn.ReLU()]


class SignalCNN(nn.Module):
    """Two strided conv blocks, global average pooling, a linear head."""

    def __init__(self, num_classes: int, channels: int, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(channels, width, 7, 2),
            *_conv_bn(width, 2 * width, 5, 2),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, 1, L) -> (B, classes)
        return self.head(self.features(_as_1d(x)))


class BasicBlock1d(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(cin, cout, 7, stride),
            nn.Conv1d(cout, cout, 7, 1, 3, bias=False),
            nn.BatchNorm1d(cout),
        )
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(
                nn.Conv1d(cin, cout, 1, stride, bias=False), nn.BatchNorm1d(cout)
            )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, cin, L) -> (B, cout, L/stride)
        return self.act(self.body(x) + self.skip(x))


class SignalResNet(nn.Module):
    """Strided stem conv, stages of basic blocks (widths double, length halves), GAP, linear."""

    def __init__(
        self, num_classes: int, channels: int, widths: tuple[int, ...], blocks: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = _conv_bn(channels, widths[0], 7, 2)
        cin = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock1d(cin, w, 2 if (b == 0 and i > 0) else 1))
                cin = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, 1, L) -> (B, classes)
        return self.head(self.features(_as_1d(x)))


@register("mlp1d", family="mlp", default_input_shape=SIGNAL_SHAPE, reference="tiny MLP")
def mlp1d(num_classes: int, input_shape: tuple[int, int, int], width: int = 8) -> nn.Module:
    return SignalMLP(num_classes, input_shape[0], _length(input_shape), width)


@register("cnn1d_small", family="cnn", default_input_shape=SIGNAL_SHAPE, reference="small 1D CNN")
def cnn1d_small(num_classes: int, input_shape: tuple[int, int, int], width: int = 12) -> nn.Module:
    _length(input_shape)
    return SignalCNN(num_classes, input_shape[0], width)


@register(
    "resnet1d",
    family="resnet",
    default_input_shape=SIGNAL_SHAPE,
    reference="1D ResNet (Wang et al. 2017, time-series classification baselines)",
)
def resnet1d(
    num_classes: int, input_shape: tuple[int, int, int], width: int = 16, blocks: int = 1
) -> nn.Module:
    _length(input_shape)
    return SignalResNet(num_classes, input_shape[0], (width, 2 * width, 4 * width), blocks)
