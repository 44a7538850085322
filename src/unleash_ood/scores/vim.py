"""ViM: energy minus the feature norm outside the ID principal subspace."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.outputs import Outputs
from unleash_ood.scores.base import Scorer, check_range, head_params
from unleash_ood.scores.softmax import energy
from unleash_ood.scores.stats import block_map, block_sum, second_moment


def default_dim(feature_dim: int) -> int:
    """Principal-subspace size used by the ViM paper for its backbones, scaled for small ones."""
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


@dataclass
class ViM(Scorer):
    """Virtual-logit matching (Wang et al., CVPR 2022).

    The logits only see the part of a feature the head projects on; OOD features have much of
    their norm in directions ID training features do not use. ViM measures that residual
    (around the origin ``-pinv(W) b``, where all logits vanish, with the uncentred covariance as
    in the paper), scales it by ``alpha`` to match the size of ID max logits, and subtracts it
    from the energy.
    """

    name = "vim"
    requires_fit = True
    dim: int | None = None
    origin_: torch.Tensor | None = field(default=None, init=False, repr=False)
    residual_basis_: torch.Tensor | None = field(default=None, init=False, repr=False)
    alpha_: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.dim is not None:
            check_range(self, "dim", 1, integer=True, include_low=True)

    def fit(self, train: Outputs, head: nn.Linear) -> ViM:
        weight, bias = head_params(head)
        d = weight.shape[1]
        dim = default_dim(d) if self.dim is None else self.dim
        if dim >= d:
            raise UserError(
                f"vim: dim={dim} must be smaller than the feature dimension {d}; "
                f"use a smaller dim (e.g. {default_dim(d)})"
            )
        self.origin_ = -torch.linalg.pinv(weight) @ bias
        moment = second_moment(train.features, self.origin_)
        _, eigvecs = torch.linalg.eigh(moment)  # ascending eigenvalues
        self.residual_basis_ = eigvecs[:, : d - dim]
        max_logit = block_sum(lambda z: z.max(dim=1).values.double().sum(), train.logits)
        residual = block_sum(lambda x: self._residual(x).sum(), train.features)
        self.alpha_ = float(max_logit / residual)
        return self

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()
        return energy(outputs.logits) - self.alpha_ * block_map(self._residual, outputs.features)

    def _residual(self, features: torch.Tensor) -> torch.Tensor:
        return ((features.double() - self.origin_) @ self.residual_basis_).norm(dim=1)
