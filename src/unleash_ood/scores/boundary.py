"""Scores from the geometry of the head around the ID feature mean: fDBD and NCI (Liu & Qin)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from unleash_ood.outputs import Outputs
from unleash_ood.scores.base import Scorer, check_range, head_params


@dataclass
class _CentredHead(Scorer):
    """A score that needs the mean ``mu`` of the ID training features (no labels)."""

    requires_fit = True
    mean_: torch.Tensor | None = field(default=None, init=False, repr=False)

    def fit(self, train: Outputs, head: nn.Linear) -> _CentredHead:
        self.mean_ = train.features.double().mean(dim=0)
        return self

    def _centred_norm(self, features: torch.Tensor) -> torch.Tensor:
        """``||z - mu||`` per row."""
        return (features.double() - self.mean_).norm(dim=1)


class FDBD(_CentredHead):
    """fast Decision Boundary based Detector (Liu & Qin, ICML 2024, "Fast decision boundary
    based out-of-distribution detector"):

        score(z) = 1 / (C - 1) * sum_{c != y} |f_y(z) - f_c(z)| / ||w_y - w_c||  /  ||z - mu||

    with ``y`` the predicted class and ``f_c(z) = w_c . z + b_c`` the logits: the mean distance
    from ``z`` to the decision boundaries between ``y`` and every other class, in feature
    space, relative to the distance from the ID training mean ``mu``. ID features lie far from
    the boundaries for their distance from the mean; OOD features close. No hyperparameters;
    OpenOOD offers ``||z||`` instead of ``||z - mu||`` as a tuned choice, the paper does not.
    """

    name = "fdbd"

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()
        weight, _ = head_params(head)
        logits = outputs.logits.double()
        top, pred = logits.max(dim=1)
        # ||w_y - w_c|| for the predicted y; the c = y term has a zero numerator.
        gaps = torch.cdist(weight, weight)
        gaps = torch.where(gaps > 0, gaps, torch.ones_like(gaps))
        mean_gap = ((top[:, None] - logits) / gaps[pred]).sum(dim=1) / (logits.shape[1] - 1)
        return mean_gap / self._centred_norm(outputs.features)


@dataclass
class NCI(_CentredHead):
    """Neural Collapse Inspired detector (Liu & Qin, CVPR 2025, "Detecting out-of-distribution
    through the lens of neural collapse"):

        score(z) = w_y . (z - mu) / ||z - mu||  +  alpha * ||z||_1

    with ``y`` the predicted class and ``mu`` the ID training feature mean. Under neural
    collapse ID features centred on ``mu`` align with their class's weight vector; the L1 norm
    term filters OOD inputs with small activations. Default ``alpha = 1e-4``, OpenOOD's (whose
    implementation the authors contributed); OpenOOD tunes it over 1e-4 ... 1e-1.
    """

    name = "nci"
    alpha: float = 1e-4

    def __post_init__(self) -> None:
        check_range(self, "alpha", 0, include_low=True)

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()
        weight, _ = head_params(head)
        feats = outputs.features.double()
        pred = outputs.logits.argmax(dim=1)
        proximity = (weight[pred] * (feats - self.mean_)).sum(dim=1) / self._centred_norm(feats)
        return proximity + self.alpha * feats.abs().sum(dim=1)
