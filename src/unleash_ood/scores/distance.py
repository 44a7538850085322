"""Distances to the ID training features: Mahalanobis (class-conditional) and k-NN."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.outputs import Outputs
from unleash_ood.scores.base import Scorer, check_range

# Similarity-matrix entries computed at once by k-NN (128 MB in float32).
_CHUNK_ELEMENTS = 2**25


@dataclass
class Mahalanobis(Scorer):
    """Negative Mahalanobis distance to the closest class mean, with one covariance shared by
    all classes (Lee et al., NeurIPS 2018).

    A tied covariance turns the features into a Gaussian discriminant analysis model, so the
    distance is a class-conditional log-density. Only the penultimate layer is used and there
    is no input preprocessing or layer ensemble: the paper's full method tunes those on OOD
    data. The covariance is inverted with a pseudo-inverse, in float64, because post-ReLU
    features often have near-dead dimensions that make it singular.
    """

    name = "mahalanobis"
    requires_fit = True
    means_: torch.Tensor | None = field(default=None, init=False, repr=False)
    precision_: torch.Tensor | None = field(default=None, init=False, repr=False)

    def fit(self, train: Outputs, head: nn.Linear) -> Mahalanobis:
        if bool((train.labels < 0).any()):
            raise UserError(
                "mahalanobis needs the class labels of the training outputs, but some are -1 "
                "(no class); fit it on the labelled ID training set"
            )
        feats = train.features.double()
        classes, index = torch.unique(train.labels, return_inverse=True)
        sums = feats.new_zeros(len(classes), feats.shape[1]).index_add_(0, index, feats)
        means = sums / torch.bincount(index).double()[:, None]
        centred = feats - means[index]
        self.precision_ = torch.linalg.pinv(centred.T @ centred / len(feats), hermitian=True)
        self.means_ = means
        return self

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()
        x, means = outputs.features.double(), self.means_
        x_p, means_p = x @ self.precision_, means @ self.precision_
        # (x - mu)^T P (x - mu) for every class at once, expanded to avoid an (N, C, D) tensor.
        sq = (x_p * x).sum(1, keepdim=True) - 2 * x_p @ means.T + (means_p * means).sum(1)
        return -sq.min(dim=1).values


def knn_distance(
    queries: torch.Tensor, bank: torch.Tensor, k: int, chunk_rows: int | None = None
) -> torch.Tensor:
    """Euclidean distance from each unit-norm query to its ``k``-th nearest unit-norm bank row.

    For unit vectors ``|q - b|^2 = 2 - 2 q.b``, so the k-th nearest neighbour is the k-th
    largest dot product; queries go through in chunks of ``chunk_rows`` (by default as many
    as keep the similarity block near ``_CHUNK_ELEMENTS`` entries).
    """
    rows = chunk_rows or max(1, _CHUNK_ELEMENTS // len(bank))
    sims = torch.cat(
        [(chunk @ bank.T).topk(k, dim=1).values[:, -1] for chunk in queries.split(rows)]
    )
    return (2 - 2 * sims.double()).clamp_min(0).sqrt()


@dataclass
class KNN(Scorer):
    """Negative distance to the ``k``-th nearest ID training feature, after L2 normalisation
    (Sun et al., ICML 2022).

    Non-parametric, so it makes no Gaussian assumption about the feature distribution;
    normalising first is what makes Euclidean distance meaningful for these features.
    """

    name = "knn"
    requires_fit = True
    k: int = 50
    bank_: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range(self, "k", 1, integer=True, include_low=True)

    def fit(self, train: Outputs, head: nn.Linear) -> KNN:
        if self.k > len(train):
            raise UserError(
                f"knn: k={self.k} is larger than the {len(train)} ID training samples; "
                f"use a smaller k"
            )
        self.bank_ = F.normalize(train.features.float(), dim=1)
        return self

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()
        return -knn_distance(F.normalize(outputs.features.float(), dim=1), self.bank_, self.k)
