"""ResNet-18 in its CIFAR form (He et al., "Deep Residual Learning for Image Recognition", 2016).

The ImageNet stem (7x7 stride-2 conv and max-pool) would shrink a 32x32 image to 8x8 before the
first residual stage, so small-image work (and the OOD literature built on it: Energy, ReAct,
Unleashing Mask) uses a single 3x3 stride-1 conv instead and keeps the four stages of
torchvision's ResNet-18. Global average pooling makes the trunk indifferent to input size, so
28x28 grey images work too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unleash_ood.models.base import Classifier


def he_init(model: nn.Module) -> None:
    """He-normal convs (fan-out, as the reference CIFAR codes of ResNet/WRN/DenseNet do),
    default BatchNorm (1, 0), zero linear biases.

    He et al., "Delving Deep into Rectifiers" (2015): keeps activation variance constant through
    ReLU layers, so deep nets train from scratch without a warm-up.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus an identity (or 1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = _conv_bn(cout, cout, 3)
        needs_projection = stride != 1 or cin != cout
        self.shortcut = _conv_bn(cin, cout, 1, stride) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + self.shortcut(x))


class ResNet18(Classifier):
    """ResNet-18 for small images: 3x3 stem, stages of [2, 2, 2, 2] BasicBlocks.

    Stage widths are ``width * (1, 2, 4, 8)`` and the feature dimension is ``8 * width``.
    ``width=64`` is the standard network (about 11.2M parameters with 10 classes);
    ``width=16`` is 16x cheaper, for CPU runs and tests.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__(
            (0.5,) * in_channels if mean is None else mean,
            (0.5,) * in_channels if std is None else std,
        )
        self.stem = nn.Sequential(*_conv_bn(in_channels, width, 3), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        cin = width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            stages += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, num_classes)
        he_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_map(x))

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, stages = self.stem(x), []
        for i, block in enumerate(self.stages):
            x = block(x)
            if i % 2:  # two blocks per resolution
                stages.append(x)
        return stages

    def pool_map(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.pool(fmap)
