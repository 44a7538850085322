"""Stage 1 of MOOD, small: masked-image-modelling pretraining of a small ViT on ID images.

MOOD (Li, Chen, Yu, He, Liu, Jia, "Rethinking Out-of-distribution (OOD) Detection: Masked
Image Modeling is All You Need", CVPR 2023; dvlab-research/MOOD) pretrains a ViT with BEiT's
masked image modelling, fine-tunes it as a classifier on the ID labels, and scores OOD inputs
with the Mahalanobis distance of the fine-tuned features (stage 2: :mod:`.mood`).

Masking follows BEiT's blockwise generator, which MOOD uses unchanged: rectangles of at least
``min_block`` patches, aspect ratio log-uniform in [0.3, 1/0.3], added until ``mask_ratio`` of
the patches are covered (a rectangle is kept only if it adds patches without overshooting; as
there, a draw that finds no such rectangle in 10 tries ends the mask a little short). BEiT
masks 75 of 196 patches (38 %) with blocks of 16 or more; at 4x4 patches of a 28x28 image
(7x7 = 49 patches) the same fractions give ``mask_ratio=0.4`` (20 patches) and ``min_block=4``.
Blocks rather than scattered patches: neighbouring patches of small images are nearly copies
of each other, so a scattered mask is solved by interpolation and teaches little.

Stated deviation: BEiT (and so MOOD) predicts, for each masked patch, its visual token from
DALL-E's discrete VAE tokenizer. Those tokenizer weights cannot be had offline, so the target
here is the masked patch's own pixels, normalised per patch (mean 0, variance 1, as MAE's
``norm_pix_loss``), predicted by a linear layer from the encoder's output token (SimMIM's
one-layer head) with the squared error averaged over masked patches only (MAE's loss; visible
patches carry no loss). The encoder sees every patch, masked ones as a learned mask token
(BEiT / SimMIM, not MAE's dropped tokens).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.generative.base import GenerativeModel
from unleash_ood.models.vit import ViTEncoder

ASPECT = (0.3, 1 / 0.3)  # BEiT's blockwise masking: min aspect 0.3, max its inverse
TRIES = 10  # BEiT: attempts to place one block before the mask is left as it is
VALIDATION_SEED = 0  # the fixed masks of the deterministic validation loss


def _uniform(low: float, high: float, g: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def blockwise_mask(
    side: int, num_masked: int, min_block: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A boolean ``(side * side,)`` mask of about ``num_masked`` patches of a square grid,
    made of rectangles as BEiT's ``MaskingGenerator`` draws them (row-major order)."""
    mask = torch.zeros(side, side, dtype=torch.bool)
    count = 0
    while count < num_masked:
        added, left = 0, num_masked - count
        for _ in range(TRIES):
            area = _uniform(min_block, left, generator)
            aspect = math.exp(_uniform(*map(math.log, ASPECT), generator))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < h < side and 0 < w < side:
                top = int(torch.randint(0, side - h + 1, (), generator=generator))
                lft = int(torch.randint(0, side - w + 1, (), generator=generator))
                block = mask[top : top + h, lft : lft + w]
                new = h * w - int(block.sum())
                if 0 < new <= left:
                    block.fill_(True)
                    added = new
                    break
        if added == 0:
            break
        count += added
    return mask.flatten()


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``(N, C, H, W)`` images as ``(N, L, patch * patch * C)`` patches, in the row-major
    order of the patch embedding's output grid."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // patch) * (w // patch), -1)


def normalised_patches(x: torch.Tensor, patch: int, eps: float = 1e-6) -> torch.Tensor:
    """Each patch's pixels minus their mean, over ``sqrt(variance + eps)`` (MAE's target)."""
    p = patchify(x, patch)
    mean, var = p.mean(-1, keepdim=True), p.var(-1, unbiased=False, keepdim=True)
    return (p - mean) / (var + eps).sqrt()


def masked_patch_error(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the summed mean-squared error of its masked patches and their number."""
    err = (pred - target).pow(2).mean(-1) * mask
    return err.sum(1), mask.sum(1)


class MaskedImageModel(GenerativeModel):
    """A :class:`~unleash_ood.models.vit.ViTEncoder`, a mask token and a linear head that
    predicts the normalised pixels of masked patches. Inputs in [0, 1] are normalised with
    mean and std 0.5, as the fine-tuned :class:`~unleash_ood.models.vit.ViT` does."""

    kind: ClassVar[str] = "mim"

    def __init__(
        self,
        in_channels: int,
        input_size: int,
        patch_size: int = 4,
        dim: int = 128,
        depth: int = 6,
        heads: int = 4,
        mask_ratio: float = 0.4,
        min_block: int = 4,
    ):
        super().__init__(in_channels, input_size)
        if not 0 < mask_ratio < 1:
            raise UserError(f"mask_ratio must lie in (0, 1), not {mask_ratio!r}")
        self.encoder = ViTEncoder(in_channels, input_size, patch_size, dim, depth, heads)
        self.num_masked = round(mask_ratio * self.encoder.grid**2)
        if not 1 <= min_block <= self.num_masked:
            raise UserError(
                f"min_block must lie in [1, {self.num_masked}] (the patches masked), "
                f"not {min_block!r}"
            )
        self.arch = {"patch_size": patch_size, "dim": dim, "depth": depth, "heads": heads}
        self.mask_ratio, self.min_block = mask_ratio, min_block
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder = nn.Linear(dim, patch_size**2 * in_channels)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def options(self) -> dict[str, Any]:
        return {**self.arch, "mask_ratio": self.mask_ratio, "min_block": self.min_block}

    def masks(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, L)`` blockwise masks, one drawn per image."""
        side = self.encoder.grid
        return torch.stack(
            [blockwise_mask(side, self.num_masked, self.min_block, generator) for _ in range(n)]
        )

    def masked_error(
        self, x: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: summed squared error over its masked patches and their count."""
        mask = mask.to(x.device)
        tokens = self.encoder.tokens((x - 0.5) / 0.5, mask, self.mask_token)
        target = normalised_patches(x, self.encoder.patch_size)
        return masked_patch_error(self.decoder(tokens), target, mask)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean squared error over every masked patch of the batch (MAE's average)."""
        err, count = self.masked_error(x, self.masks(len(x)))
        return err.sum() / count.sum().clamp(min=1), {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each image's mean error over its masked patches, under masks drawn from a fixed
        seed: the deterministic validation loss."""
        g = torch.Generator().manual_seed(VALIDATION_SEED)
        err, count = self.masked_error(x, self.masks(len(x), g))
        return err / count.clamp(min=1)
