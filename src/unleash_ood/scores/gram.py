"""Gram: deviations of the Gram matrices of every stage from their ID range per class."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.outputs import Outputs
from unleash_ood.rng import numpy_rng
from unleash_ood.scores.base import Scorer, check_range
from unleash_ood.scores.stats import block_map

# Added to the range bounds before dividing by them, as in the authors' code.
_EPS = 1e-6


def range_deviation(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``relu(low - v) / |low + eps| + relu(v - high) / |high + eps|``, elementwise: how far
    ``v`` lies outside ``[low, high]``, relative to the bound it crosses."""
    below = torch.relu(low - values) / (low + _EPS).abs()
    above = torch.relu(values - high) / (high + _EPS).abs()
    return below + above


@dataclass
class Gram(Scorer):
    """``-sum_l D_l(x) / E_l`` with ``D_l(x) = sum_p sum_c delta(G_lpc(x); min, max of class
    y(x)) / msp(x)``: Sastry and Oore, "Detecting Out-of-Distribution Examples with Gram
    Matrices", ICML 2020 (code: github.com/VectorInstitute/gram-ood-detection).

    ``G_lpc`` are the row sums of the ``p``-th order Gram matrices of stage ``l``
    (:func:`~unleash_ood.models.maps.gram_rows`, ``p = 1..10``, theirs), ``y(x)`` the predicted
    class and ``msp(x)`` its softmax probability. ``min`` and ``max`` are those of the ID
    training samples predicted as that class (a class never predicted takes those of all
    samples); ``delta`` is :func:`range_deviation`; ``E_l`` is the mean deviation of stage
    ``l`` over held-out ID samples, which puts the stages on one scale.

    Deviations from the authors' code: the layers are the maps at the end of each resolution
    stage (theirs: every convolution, batch norm, shortcut and ReLU output, some 50 maps in a
    ResNet); ``E_l`` comes from ``holdout`` (10 %, seeded) of the ID training outputs, left out
    of the ranges (theirs: a random 10 % of the ID test set). Needs no labels.
    """

    name = "gram"
    requires_fit = True
    map_summaries = ("gram_rows",)
    holdout: float = 0.1
    seed: int = 0
    low_: torch.Tensor | None = field(default=None, init=False, repr=False)
    high_: torch.Tensor | None = field(default=None, init=False, repr=False)
    scale_: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range(self, "holdout", 0, 1)
        check_range(self, "seed", 0, integer=True, include_low=True)

    def fit(self, train: Outputs, head: nn.Linear) -> Gram:
        rows = train.summary("gram_rows", self.name)
        order = torch.from_numpy(numpy_rng(self.seed, "gram-holdout").permutation(len(train)))
        held = round(len(train) * self.holdout)
        if held < 1 or held == len(train):
            raise UserError(
                f"gram: holdout={self.holdout} of {len(train)} ID training samples leaves no "
                f"samples for the ranges or none to scale them; give more samples"
            )
        in_ranges = torch.ones(len(train), dtype=torch.bool)
        in_ranges[order[:held]] = False
        predicted = train.logits.argmax(dim=1)
        shape = (train.logits.shape[1], *rows.shape[1:])
        low = torch.full(shape, torch.inf, dtype=torch.float64)
        high = torch.full(shape, -torch.inf, dtype=torch.float64)
        seen = predicted[in_ranges].unique()
        for c in seen:
            mine = rows[in_ranges & (predicted == c)]
            low[c], high[c] = mine.amin(dim=0), mine.amax(dim=0)
        unseen = torch.ones(shape[0], dtype=torch.bool)
        unseen[seen] = False
        low[unseen], high[unseen] = low[seen].amin(dim=0), high[seen].amax(dim=0)
        self.low_, self.high_ = low, high
        held_out = order[:held]
        deviations = self._deviations(rows[held_out], train.logits[held_out])
        self.scale_ = deviations.mean(dim=0) + 1e-7  # as their code: a stage may never deviate
        return self

    def _deviations(self, rows: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``(N, L)``: each stage's deviation, summed over the powers and channels, divided by
        the confidence of the predicted class; in row blocks."""

        def block(r: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            confidence, predicted = z.double().softmax(dim=1).max(dim=1)
            deviation = range_deviation(r.double(), self.low_[predicted], self.high_[predicted])
            return deviation.sum(dim=(2, 3)) / confidence[:, None]

        return block_map(block, rows, logits)

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()
        rows = outputs.summary("gram_rows", self.name)
        return -(self._deviations(rows, outputs.logits) / self.scale_).sum(dim=1)
