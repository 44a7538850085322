"""The contracts of the generative area: a detector model trained on ID images alone, and a
score computed from it.

A :class:`GenerativeModel` takes images in [0, 1] (the library's format) and defines its own
training loss; it needs no labels and no classifier. A :class:`DetectorScore` maps a batch of
images to one value per image, higher for more ID-like images, like every scorer of the library.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from typing_extensions import Self

    from unleash_ood.data.base import ImageSet


class GenerativeModel(nn.Module):
    """A detector model; ``kind`` names it in the registry and in checkpoint sidecars."""

    kind: ClassVar[str]

    def __init__(self, in_channels: int, input_size: int):
        super().__init__()
        self.in_channels, self.input_size = in_channels, input_size

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of a batch (a scalar) and named parts of it, for the log.
        Randomness (latent samples, masks) comes from torch's global generator, which the
        trainer seeds with ``(seed, epoch)``."""
        raise NotImplementedError

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameter groups whose gradient norms are clipped separately."""
        return [list(self.parameters())]

    def options(self) -> dict[str, Any]:
        """The constructor options that rebuild this model (besides channels and size)."""
        raise NotImplementedError


class DetectorScore:
    """Base of every generative score; subclasses are dataclasses whose init fields are the
    user's parameters. ``kinds`` lists the models the score works on."""

    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]
    requires_fit: ClassVar[bool] = False

    def check(self, model: GenerativeModel) -> None:
        """Raise a ``UserError`` when ``model`` cannot give this score (before any work)."""

    def fit(
        self, model: GenerativeModel, train: ImageSet, device: torch.device, progress: bool
    ) -> Self:
        raise TypeError(f"{self.name} has nothing to fit")

    def score_batch(self, model: GenerativeModel, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` scores of images ``x`` in [0, 1], on ``x``'s device; higher = more ID."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
