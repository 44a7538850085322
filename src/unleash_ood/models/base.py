"""The model contract: ``features(x)`` (penultimate, pooled) and a linear ``head``.

Inputs are images in [0, 1]; each classifier normalises them itself with buffers saved in its
checkpoint, so a checkpoint is usable without knowing the training pipeline, and input-space
perturbations (ODIN) are measured in pixel units as in the original papers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Classifier(nn.Module):
    """Base of every model in the library: ``logits = head(features(x))``.

    Subclasses build their trunk and set ``self.head`` (an ``nn.Linear``) and implement
    :meth:`forward_features`, which receives normalised input.
    """

    head: nn.Linear

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer(
            "input_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, D)`` of images in [0, 1]."""
        return self.forward_features((x - self.input_mean) / self.input_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    @property
    def in_channels(self) -> int:
        """Channels of the images the model takes (one per normalisation statistic)."""
        return self.input_mean.shape[1]
