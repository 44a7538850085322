"""A small VGG-style CNN for 28x28 grey images: the embedded benchmark's default model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from unleash_ood.models.base import Classifier


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(Classifier):
    """Conv-BN-ReLU stages at 28, 14 and 7 pixels (one, two and two convolutions), global
    average pooling and a linear head.

    ``width=32`` gives about 0.28M parameters: enough capacity to memorise Fashion-MNIST,
    which the paper's phenomenon needs, while an epoch takes about 20 s on two CPU cores.
    The first stage has a single convolution because at full resolution a second one would
    cost as much as the rest of the network together.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 32,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
    ):
        super().__init__(mean, std)
        w = width
        self.trunk = nn.Sequential(
            *_conv_bn(in_channels, w),
            nn.MaxPool2d(2),
            *_conv_bn(w, 2 * w),
            *_conv_bn(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_bn(2 * w, 4 * w),
            *_conv_bn(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk[:-2](x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        stages = []
        for layer in self.trunk[:-2]:
            if isinstance(layer, nn.MaxPool2d):
                stages.append(x)
            x = layer(x)
        return [*stages, x]

    def pool_map(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.trunk[-2:](fmap)
