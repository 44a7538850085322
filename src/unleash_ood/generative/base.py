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

from unleash_ood.errors import UserError

if TYPE_CHECKING:
    from typing_extensions import Self

    from unleash_ood.data.base import ImageSet


class GenerativeModel(nn.Module):
    """A detector model; ``kind`` names it in the registry and in checkpoint sidecars."""

    kind: ClassVar[str]
    # Whether training keeps ``checkpoints/best``, the epoch whose ``-forward`` separates the
    # ID validation split best from the OOD validation sets (never the test sets).
    selects_epoch: ClassVar[bool] = False

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

    def param_groups(self) -> list[dict[str, Any]]:
        """Adam's parameter groups; options a group leaves out (lr, betas) are the recipe's."""
        return [{"params": list(self.parameters())}]

    def train_step(
        self, x: torch.Tensor, opt: torch.optim.Optimizer, grad_clip: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step on batch ``x``: backpropagate :meth:`loss`, clip each clip
        group to ``grad_clip`` (when > 0), step. Models that train several networks in turns
        (AMA's critic and autoencoder) override it; Adam skips parameters left without a
        gradient, so one optimiser with per-network groups acts as one optimiser each."""
        opt.zero_grad(set_to_none=True)
        loss, parts = self.loss(x)
        loss.backward()
        clip_gradients(self.clip_groups(), grad_clip)
        opt.step()
        return loss.detach(), parts

    def options(self) -> dict[str, Any]:
        """The constructor options that rebuild this model (besides channels and size)."""
        raise NotImplementedError


def clip_gradients(groups: list[list[nn.Parameter]], max_norm: float) -> None:
    """Clip each group's gradient norm to ``max_norm``; nothing when it is 0."""
    if max_norm > 0:
        for group in groups:
            torch.nn.utils.clip_grad_norm_(group, max_norm)


def require_integers(owner: str, least: int, **values: Any) -> None:
    """Raise a ``UserError`` unless every value is an integer ``>= least`` (a score's
    parameters come from the command line, so they may be anything)."""
    names = list(values)
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in values.values())
    if not ok or min(values.values()) < least:
        if len(names) == 1:
            raise UserError(f"{owner}'s {names[0]} must be an integer >= {least}")
        listed = f"{', '.join(names[:-1])} and {names[-1]}"
        raise UserError(f"{owner}'s {listed} must be integers >= {least}")


class DetectorScore:
    """Base of every generative score; subclasses are dataclasses whose init fields are the
    user's parameters. ``kinds`` lists the models the score works on."""

    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]
    requires_fit: ClassVar[bool] = False

    def check(self, model: GenerativeModel) -> None:
        """Raise a ``UserError`` when ``model`` cannot give this score (before any work)."""

    def applies_to(self, model: GenerativeModel) -> bool:
        """Whether ``model`` can give this score (what ``--scores all`` keeps)."""
        try:
            self.check(model)
        except UserError:
            return False
        return True

    def fit(
        self, model: GenerativeModel, train: ImageSet, device: torch.device, progress: bool
    ) -> Self:
        raise TypeError(f"{self.name} has nothing to fit")

    def score_batch(self, model: GenerativeModel, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` scores of images ``x`` in [0, 1], on ``x``'s device; higher = more ID."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
