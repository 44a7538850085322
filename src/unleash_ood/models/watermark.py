"""A classifier that adds one fixed input pattern to every image before the model it wraps:
the deployed form of Watermarking (Wang et al., NeurIPS 2022; ``method/watermark.py``).

The pattern is a buffer in pixel units (what is added to images in [0, 1]), so the wrapper's
state dict is the wrapped model's under ``model.`` plus ``pattern``, and a checkpoint sidecar
with a ``watermark`` entry rebuilds it (``checkpoint.build_model``). Every scorer and
``unleash evaluate`` then see the watermarked model as any other classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from unleash_ood.models.base import Classifier


class Watermarked(Classifier):
    """``model`` applied to ``x + pattern``; features, head and normalisation are the wrapped
    model's (the wrapper keeps no copies, so its state dict holds each tensor once)."""

    def __init__(self, model: Classifier, pattern: torch.Tensor):
        nn.Module.__init__(self)  # no buffers of its own but the pattern
        self.model = model
        pattern = pattern.detach().float().reshape(1, *pattern.shape[-3:])
        channels = model.in_channels  # the images': 1 for an RGB model fed grey ones
        if pattern.shape[1] != channels:
            raise ValueError(f"a {pattern.shape[1]}-channel pattern for a {channels}-channel model")
        self.register_buffer("pattern", pattern.clone())

    @property
    def head(self) -> nn.Linear:  # type: ignore[override]
        return self.model.head

    @property
    def input_mean(self) -> torch.Tensor:
        return self.model.input_mean

    @property
    def in_channels(self) -> int:
        return self.model.in_channels

    @property
    def input_std(self) -> torch.Tensor:
        return self.model.input_std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x + self.pattern)

    def exposes_map(self) -> bool:
        return self.model.exposes_map()

    def features_with_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.features_with_map(x + self.pattern)

    def features_with_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.model.features_with_stages(x + self.pattern)
