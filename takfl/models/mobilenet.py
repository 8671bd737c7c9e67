"""MobileNetV2-style network for phone-class tiers (Sandler 2018).

CIFAR adaptation: stride-1 stem and first stages, so 32x32 inputs keep
enough resolution; strides are dropped once the map is 1x1.

``norm="group"`` replaces every BatchNorm with GroupNorm (8 groups): the phone
variant, which trains through ExecuTorch (training-mode BatchNorm does not lower
there) and needs no batch statistics on a device with a few samples per batch.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from takfl.models.registry import register

# (expansion t, output channels c, repeats n, stride s) as in the paper's table 2,
# with the first two strides set to 1 for 32x32 inputs.
_STAGES = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


Norm = Literal["batch", "group"]
GROUPS = 8  # GroupNorm groups (every channel count here is a multiple of 8)


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(GROUPS if channels % GROUPS == 0 else 1, channels)
    return nn.BatchNorm2d(channels)


def _conv_bn(
    in_ch: int, out_ch: int, k: int, stride: int, norm: Norm, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, k, stride, k // 2, groups=groups, bias=False),
        _norm(norm, out_ch),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int, norm: Norm) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn(in_ch, hidden, 1, 1, norm)]
        layers += [
            _conv_bn(hidden, hidden, 3, stride, norm, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            _norm(norm, out_ch),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, int, int],
        width_mult: float = 1.0,
        norm: Norm = "batch",
    ) -> None:
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")

        def scaled(c: int) -> int:
            return max(8, int(c * width_mult + 4) // 8 * 8)

        size = min(input_shape[1], input_shape[2])
        in_ch = scaled(32)
        layers: list[nn.Module] = [_conv_bn(input_shape[0], in_ch, 3, 1, norm)]
        for t, c, n, s in _STAGES:
            out_ch = scaled(c)
            for i in range(n):
                stride = s if (i == 0 and size >= 2) else 1
                size = (size + stride - 1) // stride
                layers.append(InvertedResidual(in_ch, out_ch, stride, t, norm))
                in_ch = out_ch
        last = scaled(1280) if width_mult > 1.0 else 1280
        layers.append(_conv_bn(in_ch, last, 1, 1, norm))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register(
    "mobilenetv2", family="mobilenet", default_input_shape=(3, 32, 32), reference="Sandler 2018"
)
def mobilenetv2(
    num_classes: int,
    input_shape: tuple[int, int, int],
    width_mult: float = 1.0,
    norm: Norm = "batch",
) -> nn.Module:
    return MobileNetV2(num_classes, input_shape, width_mult=width_mult, norm=norm)
