"""The Unleashing Mask loss constraint and the estimate of its level xi.

UM fine-tunes a well-trained model with ``L = |CE_batch - xi| + xi`` on the ID cross-entropy.
Above xi this is plain cross-entropy; below it the gradient flips sign, so the model stops
fitting (and starts forgetting) the atypical training samples it had memorised, which the
paper holds responsible for the late decline of OOD detection.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from unleash_ood.augment import augment
from unleash_ood.data.base import ImageData
from unleash_ood.device import to_device
from unleash_ood.errors import UserError
from unleash_ood.rng import torch_generator
from unleash_ood.specs import XI_REDUCTIONS as XI_REDUCTIONS
from unleash_ood.train import Objective


def um_loss(ce_batch: torch.Tensor, xi: float) -> torch.Tensor:
    """``|CE_batch - xi| + xi``: equal to CE above xi, gradient ascent on CE below it.

    The official code applies it once to the whole batch (DataParallel gathers the logits).
    Under ``torch.distributed`` with several processes, each holding an equal share of the
    global batch, CE_batch is therefore the mean of the processes' CEs: see
    :func:`um_surrogate`, whose gradients the DDP average turns into UM's on the global batch.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return (ce_batch - xi).abs() + xi
    ce_global = ce_batch.detach().clone()
    dist.all_reduce(ce_global)
    return um_surrogate(ce_batch, ce_global / dist.get_world_size(), xi)


def um_surrogate(ce_local: torch.Tensor, ce_global: torch.Tensor, xi: float) -> torch.Tensor:
    """One process's UM loss when the batch is split: its value is the global
    ``|CE_global - xi| + xi``, its gradient ``sign(CE_global - xi)`` times its own CE's, so the
    side of xi is decided by the whole batch, not by each share."""
    side = torch.sign(ce_global - xi)
    return side * (ce_local - ce_local.detach()) + (ce_global - xi).abs() + xi


class UMObjective(Objective):
    """Training objective for :class:`~unleash_ood.train.Trainer`: UM on the ID term only."""

    def __init__(self, xi: float):
        self.xi = xi

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        logits = model(x)
        return um_loss(F.cross_entropy(logits, y), self.xi), logits


def masked_copy(model: nn.Module, fraction: float, generator: torch.Generator) -> nn.Module:
    """A copy of ``model`` with ``fraction`` of every conv/linear weight tensor set to zero.

    Exactly ``round(fraction * numel)`` entries per layer, chosen uniformly at random (the
    official estimate zeroes ``int(fraction * numel)``: 7 of 216 at 0.035, where this zeroes 8).
    """
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for m in masked.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                n = m.weight.numel()
                keep = torch.ones(n)
                keep[torch.randperm(n, generator=generator)[: round(fraction * n)]] = 0
                m.weight.mul_(keep.view(m.weight.shape).to(m.weight.device))
    return masked


@torch.no_grad()
def per_sample_losses(
    model: nn.Module,
    data: ImageData,
    augmentation: str,
    seed: int,
    device: torch.device,
    batch_size: int = 512,
    progress: str | None = None,
    workers: int = 0,
) -> torch.Tensor:
    """Eval-mode cross-entropy of every training sample, augmented with a seeded generator
    (so the masked and the unmasked model see identical images). ``progress``: the label of a
    progress bar, or None for none; ``workers``: processes decoding streamed images."""
    model.eval()
    g = torch_generator(seed, "loss-augment")
    losses = []
    batches = tqdm(
        data.batches(batch_size, workers, torch.device(device).type == "cuda"),
        total=-(-len(data) // batch_size),
        desc=progress,
        leave=False,
        disable=progress is None,
    )
    for x, y in batches:
        x = augment(x, augmentation, g, padding=x.shape[-1] // 8)
        logits = model(to_device(x, device))
        losses.append(F.cross_entropy(logits, y.to(device), reduction="none").double().cpu())
    return torch.cat(losses)


def mean_train_loss(
    model: nn.Module,
    data: ImageData,
    augmentation: str,
    seed: int,
    device: torch.device,
    batch_size: int = 512,
    progress: str | None = None,
    workers: int = 0,
) -> float:
    losses = per_sample_losses(
        model, data, augmentation, seed, device, batch_size, progress, workers
    )
    return float(losses.mean())


@dataclass(frozen=True)
class XiEstimate:
    """xi (the ``reduction`` of the per-mask values), each mask's value and the unmasked
    model's own loss."""

    xi: float
    per_mask: tuple[float, ...]
    train_loss: float
    mask_fraction: float
    reduction: str = "mean"

    @property
    def spread(self) -> float:
        return float(np.std(self.per_mask)) if len(self.per_mask) > 1 else 0.0

    @property
    def is_noop(self) -> bool:
        """True when xi is not above the training loss: UM would equal plain CE."""
        return self.xi <= self.train_loss

    def to_dict(self) -> dict:
        return {**asdict(self), "spread": self.spread, "is_noop": self.is_noop}


def estimate_loss_constraint(
    model: nn.Module,
    data: ImageData,
    mask_fraction: float = 0.035,
    seed: int = 0,
    n_masks: int = 1,
    augmentation: str = "flip",
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    reduction: str = "mean",
    progress: bool = False,
    workers: int = 0,
) -> XiEstimate:
    """The official estimate of xi (``estimate_loss.py``): mean CE of the model with a random
    ``mask_fraction`` of each conv/linear layer's weights zeroed, in eval mode, over the
    augmented training set.

    Deviation: the official code draws one mask. With ``n_masks > 1`` we draw that many (mask
    ``i`` seeded by ``(seed, i)``) and take their mean or median (``reduction``), reporting every
    mask's value: on a small model one mask can be off by a factor of three (0.644 against
    0.056-0.220 on one run), and the median keeps such a mask from setting xi.
    """
    if not 0 < mask_fraction < 1:
        raise UserError(f"mask fraction must be in (0, 1), got {mask_fraction}")
    if n_masks < 1:
        raise UserError(f"n_masks must be at least 1, got {n_masks}")
    if reduction not in XI_REDUCTIONS:
        raise UserError(
            f"xi reduction must be one of {', '.join(XI_REDUCTIONS)}, not {reduction!r}"
        )
    device = torch.device(device)
    per_mask = []
    for i in range(n_masks):
        g = torch_generator(seed, "random-mask", i)
        label = f"xi: mask {i + 1}/{n_masks}" if progress else None
        masked = masked_copy(model, mask_fraction, g)
        per_mask.append(
            mean_train_loss(masked, data, augmentation, seed, device, batch_size, label, workers)
        )
    label = "xi: unmasked model" if progress else None
    base = mean_train_loss(model, data, augmentation, seed, device, batch_size, label, workers)
    xi = float(np.mean(per_mask) if reduction == "mean" else np.median(per_mask))
    return XiEstimate(xi, tuple(per_mask), base, mask_fraction, reduction)
