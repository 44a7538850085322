"""RankFeat: the energy of the logits of a feature map whose rank-1 component is removed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.outputs import Outputs
from unleash_ood.scores.base import Scorer, check_range
from unleash_ood.scores.softmax import energy


@dataclass
class RankFeat(Scorer):
    """``T log sum_c exp(f_c / T)`` with ``f = head(mean_hw(X - s_1 u_1 v_1^T))``: the energy
    of the logits after the largest singular component of the last feature map ``X`` (a
    ``D x HW`` matrix per image) is removed (Song, Sebe and Wang, NeurIPS 2022; code:
    github.com/KingJamesSong/RankFeat, ``test_ood_resnetv2.py``). ID maps have a dominant
    singular value less often than OOD ones, so removing it changes OOD logits more.

    ``temperature = 1``, theirs. Needs no fitting. The map summary
    (:func:`~unleash_ood.models.maps.rank_one_removed`) is kept in ``Outputs`` like MODE's
    region vectors (``N x D``, the size of the features).

    Deviations from the authors' code: only the last map is used (their headline fuses the
    logits of block 3 and block 4, which needs the model's inner stages); our last map is
    taken after the final normalisation and activation, where their BiT ResNet applies its
    GroupNorm and ReLU after the removal; the head must read the average-pooled map (true of
    every built-in model and of torchvision's CNNs whose last layer is the head).
    """

    name = "rankfeat"
    map_summaries = ("rank_one_removed",)
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_range(self, "temperature", 0)

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        features = outputs.summary("rank_one_removed", self.name)
        if features.shape[1] != head.in_features:
            raise UserError(
                f"rankfeat: the model's head reads {head.in_features} features, not the "
                f"{features.shape[1]} channels of its last feature map; use another scorer"
            )
        with torch.no_grad():
            logits = head(features.to(head.weight.device, head.weight.dtype))
        return energy(logits.cpu(), self.temperature)
