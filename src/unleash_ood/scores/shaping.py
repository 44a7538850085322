"""Scores that reshape the features or the head, then take the energy: ReAct, ASH, DICE."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from unleash_ood.outputs import Outputs
from unleash_ood.scores.base import Scorer, check_range, head_params
from unleash_ood.scores.softmax import energy
from unleash_ood.scores.stats import column_mean, percentile


def linear_energy(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Energy of the logits of a (possibly modified) linear head, in float64."""
    return energy(features.double() @ weight.T + bias)


@dataclass
class ReAct(Scorer):
    """Energy after clipping features at a high percentile of the ID training activations
    (Sun et al., NeurIPS 2021).

    OOD inputs tend to cause a few abnormally large activations that make the model
    over-confident; clipping them removes most of that confidence while barely touching ID
    inputs, whose activations rarely exceed the clip.
    """

    name = "react"
    requires_fit = True
    percentile: float = 90.0
    threshold_: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        check_range(self, "percentile", 0, 100, include_low=True)

    def fit(self, train: Outputs, head: nn.Linear) -> ReAct:
        self.threshold_ = percentile(train.features, self.percentile)
        return self

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()
        clipped = outputs.features.double().clamp(max=self.threshold_)
        return linear_energy(clipped, *head_params(head))


@dataclass
class _ASH(Scorer):
    """Activation shaping (Djurisic et al., ICLR 2023): per sample, keep only the largest
    ``100 - percentile`` % of the activations, then reshape the kept ones.

    Pruning most activations barely changes ID predictions but removes much of the spurious
    evidence OOD inputs gather from many weak activations. As in OpenOOD, it acts on the pooled
    penultimate features; at least one activation is always kept.
    """

    percentile: float = 90.0

    def __post_init__(self) -> None:
        check_range(self, "percentile", 0, 100, include_low=True)

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        x = outputs.features.double()
        k = max(1, x.shape[1] - round(x.shape[1] * self.percentile / 100))
        kept, index = x.topk(k, dim=1)
        shaped = torch.zeros_like(x).scatter_(1, index, self._reshape(kept, x.sum(1, keepdim=True)))
        return linear_energy(shaped, *head_params(head))

    @staticmethod
    def _reshape(kept: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """New values ``(N, k)`` of the kept activations, given the pre-pruning sum ``(N, 1)``."""
        raise NotImplementedError


class ASHS(_ASH):
    """ASH-S (Djurisic et al., ICLR 2023): scale the kept activations by ``exp(s1 / s2)`` (sums
    before / after pruning), which restores, and sharpens, the evidence the pruning removed."""

    name = "ash_s"

    @staticmethod
    def _reshape(kept: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        kept_sum = kept.sum(1, keepdim=True)
        ratio = torch.where(kept_sum != 0, total / kept_sum, torch.zeros_like(total))
        return kept * torch.exp(ratio)


class ASHB(_ASH):
    """ASH-B (Djurisic et al., ICLR 2023): set every kept activation to ``s1 / k``, a binarised
    map that keeps only the sample's total activation and which units were largest."""

    name = "ash_b"

    @staticmethod
    def _reshape(kept: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        return (total / kept.shape[1]).expand_as(kept)


@dataclass
class DICE(Scorer):
    """Energy of a sparsified head that keeps only the weights with the largest contribution
    ``W[c, j] * mean_j`` on the ID training features (Sun & Li, ECCV 2022).

    Most weights add noise to the logits; dropping them lowers the variance of the output
    more for OOD than for ID inputs, which separates the two energies.
    """

    name = "dice"
    requires_fit = True
    sparsity: float = 90.0
    mask_: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range(self, "sparsity", 0, 100, include_low=True)

    def fit(self, train: Outputs, head: nn.Linear) -> DICE:
        weight, _ = head_params(head)
        contribution = weight * column_mean(train.features)
        self.mask_ = contribution > float(np.percentile(contribution.numpy(), self.sparsity))
        return self

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()
        weight, bias = head_params(head)
        return linear_energy(outputs.features, weight * self.mask_, bias)
