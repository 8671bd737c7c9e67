"""CIFAR-style ResNets (3x3 stem, no initial max-pool, BasicBlocks).

ResNet-8 and ResNet-14 are the 6n+2 CIFAR family (three stages, 16/32/64
channels, n = 1 and 2 blocks per stage); ResNet-18 is the four-stage
64..512 network (about 11 M parameters) used as the large tier in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from takfl.models.registry import register


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """blocks[i] BasicBlocks at widths[i] channels; stage i > 0 halves the resolution."""

    def __init__(
        self, blocks: list[int], widths: list[int], num_classes: int, in_channels: int
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        in_ch = widths[0]
        for stage, (n, width) in enumerate(zip(blocks, widths, strict=True)):
            for b in range(n):
                stride = 2 if (stage > 0 and b == 0) else 1
                layers.append(BasicBlock(in_ch, width, stride))
                in_ch = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@register("resnet8", family="resnet", default_input_shape=(3, 32, 32), reference="He 2016")
def resnet8(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    return ResNet([1, 1, 1], [16, 32, 64], num_classes, input_shape[0])


@register("resnet14", family="resnet", default_input_shape=(3, 32, 32), reference="He 2016")
def resnet14(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    return ResNet([2, 2, 2], [16, 32, 64], num_classes, input_shape[0])


@register("resnet18", family="resnet", default_input_shape=(3, 32, 32), reference="He 2016")
def resnet18(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, input_shape[0])
