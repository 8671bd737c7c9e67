"""VGG with BatchNorm, CIFAR-style head (one linear layer on 512 features).

A max-pool is skipped once the feature map is down to 1x1, so the same
network also runs on small inputs such as 8x8 digits.
"""

from __future__ import annotations

import torch
from torch import nn

from takfl.models.registry import register

# Channel counts; "M" is a 2x2 max-pool.
VGG11: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
VGG16: list[int | str] = [
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
]


class VGG(nn.Module):
    def __init__(
        self, cfg: list[int | str], num_classes: int, input_shape: tuple[int, int, int]
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch, size = input_shape[0], min(input_shape[1], input_shape[2])
        for item in cfg:
            if item == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            out_ch = int(item)
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register("vgg11", family="vgg", default_input_shape=(3, 32, 32), reference="Simonyan 2015")
def vgg11(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    return VGG(VGG11, num_classes, input_shape)


@register("vgg16", family="vgg", default_input_shape=(3, 32, 32), reference="Simonyan 2015")
def vgg16(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    return VGG(VGG16, num_classes, input_shape)
