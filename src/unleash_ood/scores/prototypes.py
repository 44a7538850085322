"""Scores against per-class prototypes of correctly classified ID training samples: SHE, OpenMax."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import weibull_min
from torch import nn

from unleash_ood.outputs import Outputs
from unleash_ood.scores.base import Scorer, check_range, class_means, require_labels


def correct_class_means(train: Outputs, values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` ``(N, D)`` per class over the correctly classified training samples;
    a class with none falls back to all its samples (zeros if it has no sample at all)."""
    classes = train.logits.shape[1]
    correct = train.logits.argmax(dim=1) == train.labels
    means = class_means(values[correct], train.labels[correct], classes)
    hits = torch.bincount(train.labels[correct], minlength=classes)
    return torch.where(hits[:, None] > 0, means, class_means(values, train.labels, classes))


@dataclass
class SHE(Scorer):
    """Simplified Hopfield energy (Zhang et al., ICLR 2023, "Out-of-distribution detection based
    on in-distribution data patterns memorization with modern Hopfield energy"):
    ``score(x) = z . m_y``, with ``m_y`` the mean feature of the correctly classified ID
    training samples of the predicted class ``y``.

    The stored pattern of each class stands for what the network memorised; an ID feature
    matches its class's pattern, an OOD one less. Needs the training labels. No parameters
    (inner product, the paper's and OpenOOD's default metric).
    """

    name = "she"
    requires_fit = True
    patterns_: torch.Tensor | None = field(default=None, init=False, repr=False)

    def fit(self, train: Outputs, head: nn.Linear) -> SHE:
        require_labels(self, train)
        self.patterns_ = correct_class_means(train, train.features.double())
        return self

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()
        pred = outputs.logits.argmax(dim=1)
        return (outputs.features.double() * self.patterns_[pred]).sum(dim=1)


@dataclass
class OpenMax(Scorer):
    """OpenMax (Bendale & Boult, CVPR 2016, "Towards open set deep networks"): minus the
    probability of the extra "unknown" class after recalibrating the logits with per-class
    Weibull models of distances to the class mean.

    Fit, per class ``c``: the mean logit vector ``mu_c`` of correctly classified training
    samples, and a Weibull fit to the ``tail`` largest of their distances ``||f - mu_c||``.
    Score: the top ``alpha`` classes by logit get weights ``w_c = 1 - (alpha - r_c + 1) /
    alpha * CDF_c(||f - mu_c||)`` (rank ``r_c`` = 1 for the top class; ``w_c = 1`` for the
    rest), logits ``f_c w_c``, an unknown logit ``sum_c f_c (1 - w_c)``, and a softmax over the
    ``C + 1``; ``score = -p_unknown``. Defaults ``tail = 20``, ``alpha = 3`` and Euclidean
    distances, OpenOOD's (the paper: ``alpha = 10`` of 1000 classes, euclidean-cosine mix).
    Deviation: each Weibull is a maximum-likelihood fit (``scipy.stats``) with its location
    fixed just below the smallest tail distance, so that distances within the bulk of the
    class get CDF 0; libMR's ``FitHigh`` gets the same effect by shifting the tail by a large
    constant before a two-parameter fit. Needs the training labels.
    """

    name = "openmax"
    requires_fit = True
    tail: int = 20
    alpha: int = 3
    means_: torch.Tensor | None = field(default=None, init=False, repr=False)
    loc_: torch.Tensor | None = field(default=None, init=False, repr=False)
    shape_: torch.Tensor | None = field(default=None, init=False, repr=False)
    scale_: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range(self, "tail", 2, integer=True, include_low=True)
        check_range(self, "alpha", 1, integer=True, include_low=True)

    def fit(self, train: Outputs, head: nn.Linear) -> OpenMax:
        require_labels(self, train)
        logits = train.logits.double()
        self.means_ = correct_class_means(train, logits)
        correct = logits.argmax(dim=1) == train.labels
        params = []
        for c, mean in enumerate(self.means_):
            mine = logits[correct & (train.labels == c)]
            if len(mine) < 2:  # too few to fit: fall back to every sample of the class
                mine = logits[train.labels == c]
            if len(mine) < 2:  # nothing to fit: this class never recalibrates (CDF 0)
                params.append((math.inf, 1.0, 1.0))
                continue
            dist = np.sort((mine - mean).norm(dim=1).numpy())[-self.tail :]
            loc = dist[0] - max(1e-9, 1e-3 * (dist[-1] - dist[0]))
            shape, _, scale = weibull_min.fit(dist, floc=loc)
            params.append((loc, shape, scale))
        self.loc_, self.shape_, self.scale_ = torch.tensor(params).double().T
        return self

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()
        logits = outputs.logits.double()
        classes = logits.shape[1]
        alpha = min(self.alpha, classes)
        rank_weight = logits.new_zeros(logits.shape)
        top = logits.topk(alpha, dim=1).indices
        steps = torch.arange(alpha, 0, -1, dtype=torch.float64) / alpha  # 1, ..., 1 / alpha
        rank_weight.scatter_(1, top, steps.expand(len(logits), -1))
        dist = torch.cdist(logits, self.means_)
        excess = (dist - self.loc_).clamp(min=0)
        cdf = 1 - torch.exp(-((excess / self.scale_) ** self.shape_))
        revised = logits * (1 - rank_weight * cdf)
        unknown = (logits - revised).sum(dim=1, keepdim=True)
        return -torch.softmax(torch.cat([revised, unknown], dim=1), dim=1)[:, -1]
