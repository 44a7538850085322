"""Wide Residual Network (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

WRN-40-2 with dropout 0.3 is the CIFAR model of Outlier Exposure (Hendrycks et al., ICLR 2019)
and of the Energy-score paper (Liu et al., NeurIPS 2020), so results with it compare directly
with theirs. The block layout follows their code: pre-activation (BN-ReLU before each conv), a
1x1 projection fed by the pre-activated input when the shape changes, and dropout between the
two convs of a block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.models.base import Classifier
from unleash_ood.models.resnet import he_init


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float):
        super().__init__()
        self.act1 = _bn_relu(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.act2 = _bn_relu(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.projection = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(x)
        out = self.act2(self.conv1(pre))
        out = F.dropout(out, p=self.drop_rate, training=self.training)
        # When the shape changes the reference code projects the *activated* input.
        shortcut = x if self.projection is None else self.projection(pre)
        return shortcut + self.conv2(out)


class WideResNet(Classifier):
    """WRN-``depth``-``widen_factor``: three stages of ``(depth - 4) / 6`` wide blocks.

    Stage widths are ``(16, 32, 64) * widen_factor``, so the feature dimension is
    ``64 * widen_factor`` (128 for WRN-40-2, about 2.2M parameters with 10 classes).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        depth: int = 40,
        widen_factor: int = 2,
        drop_rate: float = 0.3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        if depth < 10 or (depth - 4) % 6:
            raise UserError(
                f"WideResNet depth must be 6n + 4 with n >= 1 (e.g. 16, 28, 40); got {depth}"
            )
        super().__init__(
            (0.5,) * in_channels if mean is None else mean,
            (0.5,) * in_channels if std is None else std,
        )
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        cin = 16
        for i, stride in enumerate((1, 2, 2)):
            cout = 16 * widen_factor * 2**i
            blocks += [
                WideBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1, drop_rate)
                for j in range(n)
            ]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.blocks_per_stage = n
        self.final = nn.Sequential(_bn_relu(cin), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, num_classes)
        he_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.blocks(self.stem(x)))

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.final[0](self.blocks(self.stem(x)))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, stages = self.stem(x), []
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            if i % self.blocks_per_stage == 0:
                stages.append(x)
        stages[-1] = self.final[0](x)  # the last map after its BN-ReLU, as forward_map
        return stages

    def pool_map(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.final[1:](fmap)
