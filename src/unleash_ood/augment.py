"""Batched augmentation on uint8-derived float tensors, driven by an explicit generator.

Operating on whole batches avoids a per-sample Python loop (the usual cost of torchvision
transforms on small images), and the explicit generator makes every epoch's randomness a
function of (seed, epoch), which is what lets a resumed run reproduce an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unleash_ood.specs import AUGMENTATIONS as AUGMENTATIONS


def random_crop(
    x: torch.Tensor, padding: int, g: torch.Generator, size: int | None = None
) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop to ``size`` (default: the original size) at a random
    offset per image, as torchvision's ``RandomCrop(size, padding)``."""
    n, _, h, w = x.shape
    out_h, out_w = (h, w) if size is None else (size, size)
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, h + 2 * padding - out_h + 1, (n,), generator=g)
    dx = torch.randint(0, w + 2 * padding - out_w + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(out_h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(out_w))[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    chans = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment(x: torch.Tensor, kind: str, g: torch.Generator, padding: int) -> torch.Tensor:
    if kind == "none":
        return x
    if kind != "flip":
        x = random_crop(x, padding, g)
    return random_flip(x, g) if kind.endswith("flip") else x
