"""Distances to the ID training features: Mahalanobis (class-conditional), SSD's single Gaussian
and k-NN."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.outputs import Outputs
from unleash_ood.scores.base import Scorer, check_range, neighbour_count_problem
from unleash_ood.scores.stats import (
    block_map,
    block_sum,
    class_means,
    shared_covariance,
    squared_mahalanobis,
)

# Query rows and bank rows of one tile of the k-NN search: a 16 MiB float32 similarity block.
_QUERY_ROWS = 128
_BANK_ROWS = 32768
# Bank columns per group in the k-NN search's candidate selection.
_GROUP = 32


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
        classes, means = class_means(train.features, train.labels)
        covariance = shared_covariance(train.features, train.labels, classes, means)
        self.precision_ = torch.linalg.pinv(covariance, hermitian=True)
        self.means_ = means
        return self

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()

        def closest(x: torch.Tensor) -> torch.Tensor:
            sq = squared_mahalanobis(x.double(), self.means_, self.precision_)
            return -sq.min(dim=1).values

        return block_map(closest, outputs.features)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, in float64."""
    return F.normalize(x.double(), dim=1)


@dataclass
class SSD(Scorer):
    """Negative Mahalanobis distance to one Gaussian of all L2-normalised ID training features,
    labels unused: SSD's score with one cluster (Sehwag, Chiang and Mittal, ICLR 2021), the
    score MOOD gives its fine-tuned ViT (dvlab-research/MOOD, ``ood_utils.py``,
    ``get_scores_one_cluster``): the mean and the biased covariance (``np.cov(bias=True)``) of
    the normalised training features, its pseudo-inverse, in float64. Deviation: MOOD extracts
    the training features with its training augmentation on; here they are the clean images'.
    """

    name = "ssd"
    requires_fit = True
    mean_: torch.Tensor | None = field(default=None, init=False, repr=False)
    precision_: torch.Tensor | None = field(default=None, init=False, repr=False)

    def fit(self, train: Outputs, head: nn.Linear) -> SSD:
        n = len(train.features)
        mean = block_sum(lambda x: unit_rows(x).sum(0), train.features) / n

        def scatter(x: torch.Tensor) -> torch.Tensor:
            centred = unit_rows(x) - mean
            return centred.T @ centred

        covariance = block_sum(scatter, train.features) / n
        self.precision_ = torch.linalg.pinv(covariance, hermitian=True)
        self.mean_ = mean
        return self

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()
        mean = self.mean_[None]
        return block_map(
            lambda x: -squared_mahalanobis(unit_rows(x), mean, self.precision_)[:, 0],
            outputs.features,
        )


def top_candidates(
    sims: torch.Tensor, k: int, floor: torch.Tensor, group: int = _GROUP
) -> torch.Tensor:
    """Columns of ``sims`` ``(R, W)`` that hold every entry among a row's ``k`` largest which is
    larger than the row's ``floor`` ``(R,)`` (the k-th best similarity found so far).

    A full-width top-k is the slow part of a k-NN search, so it is run on few candidates:
    split each row into groups of ``group`` columns. Only groups whose maximum exceeds the
    floor can hold such an entry, and of those only the ``k`` with the largest maxima (an
    entry in any other group is at most that group's maximum, which is at most each of the
    ``k`` larger maxima, so at least ``k`` candidates are as large as it). Every row takes its
    ``m`` groups with the largest maxima, ``m`` the most any row of the block needs; once the
    floor has risen after the first bank tiles, ``m`` is small. Columns after the last whole
    group are always kept. Ties cannot change the ``k`` values kept.
    """
    rows, width = sims.shape
    groups = width // group
    grouped = sims[:, : groups * group].view(rows, groups, group)
    maxima = grouped.amax(dim=2)
    needed = min(k, int((maxima > floor[:, None]).sum(dim=1).max())) if groups else 0
    top_groups = maxima.topk(needed, dim=1, sorted=False).indices
    picked = grouped.gather(1, top_groups[:, :, None].expand(-1, -1, group)).view(rows, -1)
    return torch.cat([picked, sims[:, groups * group :]], dim=1)


def kth_similarity(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    query_rows: int = _QUERY_ROWS,
    bank_rows: int = _BANK_ROWS,
) -> torch.Tensor:
    """The ``k``-th largest dot product ``q.b`` of each query row with the bank's rows.

    The search is tiled over both queries and bank: each chunk of ``query_rows`` queries
    meets the bank ``bank_rows`` rows at a time and keeps a running ``k`` best similarities
    per query, merged with each tile's :func:`top_candidates` above the current k-th best.
    Time is therefore linear in the bank, and the memory beyond the inputs is one
    ``query_rows x bank_rows`` block, allocated once (a fresh block per tile costs as much in
    page faults as the product itself), whatever the bank's size; the bank is only read. The
    bank must have at least ``k`` rows.
    """
    tile = bank.new_empty(min(query_rows, len(queries)) * min(bank_rows, len(bank)))
    kth = []
    for chunk in queries.split(query_rows):
        best = chunk.new_full((len(chunk), k), float("-inf"))
        for part in bank.split(bank_rows):
            block = tile[: len(chunk) * len(part)].view(len(chunk), len(part))
            sims = torch.mm(chunk, part.T, out=block)
            found = top_candidates(sims, k, best.amin(dim=1))
            if found.shape[1]:
                best = torch.cat([best, found], dim=1).topk(k, dim=1, sorted=False).values
        kth.append(best.amin(dim=1))
    return torch.cat(kth)


def knn_distance(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    query_rows: int = _QUERY_ROWS,
    bank_rows: int = _BANK_ROWS,
) -> torch.Tensor:
    """Euclidean distance from each unit-norm query to its ``k``-th nearest unit-norm bank row.

    For unit vectors ``|q - b|^2 = 2 - 2 q.b``, so the k-th nearest neighbour is the k-th
    largest dot product (:func:`kth_similarity`, tiled, linear in the bank).
    """
    kth = kth_similarity(queries, bank, k, query_rows, bank_rows)
    return (2 - 2 * kth.double()).clamp_min(0).sqrt()


def euclidean_knn_distance(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Euclidean distance from each query to its ``k``-th nearest bank row, any norms.

    The same tiled search on ``[q, 1]`` and ``[b, -|b|^2 / 2]``, whose dot product
    ``q.b - |b|^2 / 2 = (|q|^2 - |q - b|^2) / 2`` orders the bank by distance to ``q``.
    Searching a set against itself, the nearest row of each is itself: ask for ``k + 1``.
    """
    ones = queries.new_ones(len(queries), 1)
    lifted = torch.cat([bank, -0.5 * bank.square().sum(dim=1, keepdim=True)], dim=1)
    kth = kth_similarity(torch.cat([queries, ones], dim=1), lifted, k)
    return (queries.double().square().sum(dim=1) - 2 * kth.double()).clamp_min(0).sqrt()


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

    def fit_problem(self, n: int) -> str | None:
        return neighbour_count_problem(self.k, n)

    def fit(self, train: Outputs, head: nn.Linear) -> KNN:
        self.check_fit_size(len(train))
        self.bank_ = F.normalize(train.features.float(), dim=1)
        return self

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()
        return block_map(
            lambda x: -knn_distance(F.normalize(x.float(), dim=1), self.bank_, self.k),
            outputs.features,
        )
