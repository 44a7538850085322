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
# Bank columns per group in the k-th-largest search of k-NN.
_GROUP = 64


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


def kth_largest(sims: torch.Tensor, k: int, group: int = _GROUP) -> torch.Tensor:
    """The ``k``-th largest entry of each row of ``sims`` ``(R, G * group)``, exactly.

    A full-width top-k is the slow part of a k-NN search, so it is run on few candidates:
    split each row into groups of ``group`` columns; only the ``k`` groups with the largest
    maxima can hold the row's ``k`` largest values. (An entry in any other group is at most
    that group's maximum, which is at most each of the ``k`` larger maxima, so at least
    ``k`` candidates are as large as it.) Ties cannot change the value found.
    """
    rows = sims.shape[0]
    grouped = sims.view(rows, -1, group)
    top_groups = grouped.amax(dim=2).topk(k, dim=1, sorted=False).indices
    candidates = grouped.gather(1, top_groups[:, :, None].expand(-1, -1, group))
    return candidates.view(rows, -1).topk(k, dim=1, sorted=False).values.amin(dim=1)


def knn_distance(
    queries: torch.Tensor, bank: torch.Tensor, k: int, chunk_rows: int | None = None
) -> torch.Tensor:
    """Euclidean distance from each unit-norm query to its ``k``-th nearest unit-norm bank row.

    For unit vectors ``|q - b|^2 = 2 - 2 q.b``, so the k-th nearest neighbour is the k-th
    largest dot product; queries go through in chunks of ``chunk_rows`` (by default as many
    as keep the similarity block near ``_CHUNK_ELEMENTS`` entries). The block is allocated
    once: a fresh 128 MB tensor per chunk costs as much in page faults as the product itself.
    Banks of at least ``k`` groups are padded to whole groups with columns of ``-inf`` and
    searched by :func:`kth_largest`; smaller ones take a plain top-k.
    """
    n = len(bank)
    grouped = n >= k * _GROUP
    width = -(-n // _GROUP) * _GROUP if grouped else n
    padded = F.pad(bank, (0, 0, 0, width - n))
    rows = chunk_rows or max(1, _CHUNK_ELEMENTS // width)
    block = bank.new_empty(min(rows, len(queries)), width)
    sims = []
    for chunk in queries.split(rows):
        s = torch.mm(chunk, padded.T, out=block[: len(chunk)])
        s[:, n:] = float("-inf")
        sims.append(kth_largest(s, k) if grouped else s.topk(k, dim=1).values[:, -1])
    return (2 - 2 * torch.cat(sims).double()).clamp_min(0).sqrt()


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
