"""DenseNet-BC (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017).

DenseNet-BC-100 with growth rate 12 is the CIFAR model of ODIN (Liang et al., ICLR 2018), the
Energy score (Liu et al., NeurIPS 2020) and Unleashing Mask (Zhu et al., ICML 2023), whose code
calls it "DenseNet-101" (``DenseNet3``); the headline numbers of the paper are for this network.
The layout follows that code: a 3x3 stem of ``2 * growth_rate`` channels, three dense blocks of
``(depth - 4) / 6`` bottleneck layers, transitions halving channels and resolution, and a final
BN-ReLU before global pooling. For depth 100 the feature dimension is 342.

Its BatchNorm layers are affine by default, as in ODIN's and Energy's DenseNet; the Unleashing
Mask configs use BatchNorm without scale and shift (``bn_type: NonAffineBatchNorm``) and dropout
0.3 (``configs/smallscale/densenet_cifar10*.yaml``): ``--model-arg bn_affine=false
--model-arg drop_rate=0.3`` builds that network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.models.base import Classifier
from unleash_ood.models.resnet import he_init


def _bn_relu_conv(cin: int, cout: int, kernel: int, affine: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(cin, affine=affine),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
    )


class Bottleneck(nn.Module):
    """BN-ReLU-conv1x1 to ``4 * growth`` channels, BN-ReLU-conv3x3 to ``growth``, concatenated
    to the input (the "B" of DenseNet-BC: the 1x1 keeps the 3x3 cheap as the input widens)."""

    def __init__(self, cin: int, growth: int, drop_rate: float, affine: bool = True):
        super().__init__()
        self.reduce = _bn_relu_conv(cin, 4 * growth, 1, affine)
        self.grow = _bn_relu_conv(4 * growth, growth, 3, affine)
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.dropout(self.reduce(x), p=self.drop_rate, training=self.training)
        out = F.dropout(self.grow(out), p=self.drop_rate, training=self.training)
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 compressing the channels (the "C" of DenseNet-BC), then 2x2 avg pool."""

    def __init__(self, cin: int, cout: int, drop_rate: float, affine: bool = True):
        super().__init__()
        self.compress = _bn_relu_conv(cin, cout, 1, affine)
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.dropout(self.compress(x), p=self.drop_rate, training=self.training)
        return F.avg_pool2d(out, 2)


class DenseNetBC(Classifier):
    """DenseNet-BC-``depth`` with growth rate ``growth_rate`` and compression ``reduction``;
    ``bn_affine=False``: BatchNorm without scale and shift, as the Unleashing Mask code.

    Depth 100, growth 12 has about 0.77M parameters (10 classes) and 342 features.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        depth: int = 100,
        growth_rate: int = 12,
        reduction: float = 0.5,
        drop_rate: float = 0.0,
        bn_affine: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        if depth < 10 or (depth - 4) % 6:
            raise UserError(
                f"DenseNet-BC depth must be 6n + 4 with n >= 1 (e.g. 40, 100); got {depth}"
            )
        if not 0 < reduction <= 1:
            raise UserError(f"DenseNet-BC reduction must be in (0, 1]; got {reduction}")
        if not isinstance(bn_affine, bool):
            raise UserError(f"DenseNet-BC bn_affine must be true or false; got {bn_affine!r}")
        super().__init__(
            (0.5,) * in_channels if mean is None else mean,
            (0.5,) * in_channels if std is None else std,
        )
        layers_per_block = (depth - 4) // 6
        channels = 2 * growth_rate
        body: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)]
        for block in range(3):
            for _ in range(layers_per_block):
                body.append(Bottleneck(channels, growth_rate, drop_rate, bn_affine))
                channels += growth_rate
            if block < 2:
                compressed = math.floor(channels * reduction)
                body.append(Transition(channels, compressed, drop_rate, bn_affine))
                channels = compressed
        body += [nn.BatchNorm2d(channels, affine=bn_affine), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*body)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, num_classes)
        he_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x))

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        stages = []
        for layer in self.body:
            if isinstance(layer, Transition):
                stages.append(x)  # a dense block's output
            x = layer(x)
        return [*stages, x]

    def pool_map(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.pool(fmap)
