"""RMDS: the Mahalanobis distance to the closest class minus the distance to the whole ID data."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from unleash_ood.outputs import Outputs
from unleash_ood.scores.base import Scorer, require_labels
from unleash_ood.scores.stats import (
    block_map,
    class_means,
    column_mean,
    second_moment,
    shared_covariance,
    squared_mahalanobis,
)


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
        # Statistics accumulated over row blocks (scores/stats.py): memory beyond the
        # features is O(D^2), whatever the number of training rows.
        require_labels(self, train)
        classes, self.means_ = class_means(train.features, train.labels)
        covariance = shared_covariance(train.features, train.labels, classes, self.means_)
        self.precision_ = torch.linalg.pinv(covariance, hermitian=True)
        self.global_mean_ = column_mean(train.features)[None]
        background = second_moment(train.features, self.global_mean_)
        self.global_precision_ = torch.linalg.pinv(background, hermitian=True)
        return self

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()

        def relative(x: torch.Tensor) -> torch.Tensor:
            x = x.double()
            per_class = squared_mahalanobis(x, self.means_, self.precision_)
            background = squared_mahalanobis(x, self.global_mean_, self.global_precision_)
            return -(per_class - background).min(dim=1).values

        return block_map(relative, outputs.features)
