"""RMDS: the Mahalanobis distance to the closest class minus the distance to the whole ID data."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from unleash_ood.outputs import Outputs
from unleash_ood.scores.base import Scorer, class_means, require_labels


def precision(centred: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverse of the maximum-likelihood covariance of already centred rows, float64."""
    return torch.linalg.pinv(centred.T @ centred / len(centred), hermitian=True)


def squared_mahalanobis(x: torch.Tensor, means: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    """``(x - mu_k)^T P (x - mu_k)`` for every row of ``x`` ``(N, D)`` and mean ``(K, D)``."""
    x_p = x @ prec
    return (x_p * x).sum(1, keepdim=True) - 2 * x_p @ means.T + ((means @ prec) * means).sum(1)


@dataclass
class RMDS(Scorer):
    """Relative Mahalanobis distance (Ren et al., 2021, "A simple fix to Mahalanobis distance for
    improving near-OOD detection"): ``-min_k [MD_k(z) - MD_0(z)]``.

    ``MD_k`` is the squared Mahalanobis distance to class mean ``mu_k`` under the covariance
    shared by all classes (as in ``mahalanobis``); ``MD_0`` the distance to the mean of all ID
    training features under their own covariance. Subtracting ``MD_0`` removes what the
    features of every input share (e.g. directions of large variance that carry no class
    information), which is what makes the plain Mahalanobis score fail on near-OOD data.
    Needs the class labels of the ID training outputs. No hyperparameters. Covariances are the
    maximum-likelihood ones (as in the paper and OpenOOD's ``rmds``), inverted with a
    pseudo-inverse in float64 for post-ReLU features with dead units.
    """

    name = "rmds"
    requires_fit = True
    means_: torch.Tensor | None = field(default=None, init=False, repr=False)
    precision_: torch.Tensor | None = field(default=None, init=False, repr=False)
    global_mean_: torch.Tensor | None = field(default=None, init=False, repr=False)
    global_precision_: torch.Tensor | None = field(default=None, init=False, repr=False)

    def fit(self, train: Outputs, head: nn.Linear) -> RMDS:
        require_labels(self, train)
        feats = train.features.double()
        self.means_ = class_means(feats, train.labels, head.out_features)
        self.precision_ = precision(feats - self.means_[train.labels])
        self.global_mean_ = feats.mean(dim=0, keepdim=True)
        self.global_precision_ = precision(feats - self.global_mean_)
        return self

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()
        x = outputs.features.double()
        per_class = squared_mahalanobis(x, self.means_, self.precision_)
        background = squared_mahalanobis(x, self.global_mean_, self.global_precision_)
        return -(per_class - background).min(dim=1).values
