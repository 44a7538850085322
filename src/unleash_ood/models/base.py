"""The model contract: ``features(x)`` (penultimate, pooled) and a linear ``head``.

Inputs are images in [0, 1]; each classifier normalises them itself with buffers saved in its
checkpoint, so a checkpoint is usable without knowing the training pipeline, and input-space
perturbations (ODIN) are measured in pixel units as in the original papers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from unleash_ood.errors import UserError


class Classifier(nn.Module):
    """Base of every model in the library: ``logits = head(features(x))``.

    Subclasses build their trunk and set ``self.head`` (an ``nn.Linear``) and implement
    :meth:`forward_features`, which receives normalised input. Convolutional subclasses also
    expose their last feature map before pooling (:meth:`forward_map` and :meth:`pool_map`,
    with ``forward_features = pool_map o forward_map``), which the feature-map scorers read.
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

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map ``(N, D, H, W)`` before pooling, of normalised input."""
        raise UserError(
            f"{type(self).__name__} does not expose its last feature map before pooling, which "
            "the feature-map scorers (mode) need; use another scorer, or a built-in model"
        )

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The map at the end of each resolution stage, of normalised input, the last being
        :meth:`forward_map`'s; a model that exposes only its last map returns that alone."""
        return [self.forward_map(x)]

    def pool_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """The penultimate features ``(N, D)`` of a feature map: global average pooling."""
        return fmap.mean(dim=(2, 3))

    def exposes_map(self) -> bool:
        """Whether :meth:`features_with_map` works for this model."""
        return type(self).forward_map is not Classifier.forward_map

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, D)`` of images in [0, 1]."""
        return self.forward_features(self._normalise(x))

    def features_with_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features ``(N, D)`` and the last feature map ``(N, D, H, W)`` they are
        pooled from, of images in [0, 1], in one forward pass."""
        fmap = self.forward_map(self._normalise(x))
        return self.pool_map(fmap), fmap

    def features_with_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Penultimate features and the maps of :meth:`forward_stages`, in one forward pass."""
        stages = self.forward_stages(self._normalise(x))
        return self.pool_map(stages[-1]), stages

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_mean) / self.input_std

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


def load_fitting_state(
    net: nn.Module, state: dict[str, torch.Tensor], source: str, target: str, hint: str
) -> None:
    """Load ``state`` into ``net`` only if it fits exactly: the same parameter names and
    shapes. A mismatch is one line naming ``source`` (the weights file), ``target`` (what it
    should fit) and ``hint`` (what to do about missing or unexpected names)."""
    model_keys = set(net.state_dict())
    missing, unexpected = sorted(model_keys - set(state)), sorted(set(state) - model_keys)
    if missing or unexpected:
        raise UserError(
            f"{source} does not fit {target} (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); {hint}"
        )
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        last = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"{source} does not fit {target}: {last}") from e
