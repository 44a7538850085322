"""ViM's residual alone: the feature norm outside the ID principal subspace."""

from __future__ import annotations

import torch
from torch import nn

from unleash_ood.outputs import Outputs
from unleash_ood.scores.vim import ViM


class Residual(ViM):
    """Residual (Wang et al., CVPR 2022, the ViM paper's ablation; OpenOOD's ``residual``):
    ``-||(z - o) R||``, the norm of the feature, around the origin ``o = -pinv(W) b``, in the
    directions ``R`` outside the ``dim`` leading principal components of the ID training
    features.

    ViM without the energy term: it ignores the logits entirely. Same fit and ``dim`` default
    as ``vim`` (the paper's sizes for large backbones, half the feature dimension below 768);
    OpenOOD fixes ``dim = 512``.
    """

    name = "residual"

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()
        return -self._residual(outputs.features)
