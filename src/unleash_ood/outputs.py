"""What one forward pass over a dataset leaves behind: features, logits, labels.

Every post-hoc scorer that does not need input gradients can be computed from these, so the
evaluator runs each model over each dataset once and hands the same ``Outputs`` to all scorers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unleash_ood.errors import UserError


@dataclass(frozen=True)
class Outputs:
    """Penultimate features ``(N, D)``, logits ``(N, C)`` and labels ``(N,)``.

    Labels are ``-1`` where a sample has no class (OOD data). Tensors live on the CPU in
    float32 so that scorers see the same numbers whatever device produced them.
    """

    features: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        n = self.logits.shape[0]
        if self.features.shape[0] != n or self.labels.shape[0] != n:
            raise ValueError(
                f"features, logits and labels disagree on the sample count: "
                f"{self.features.shape[0]}, {n}, {self.labels.shape[0]}"
            )

    def __len__(self) -> int:
        return self.logits.shape[0]

    def check_finite(self, what: str) -> None:
        """Refuse NaN/inf logits: every score and metric downstream would be meaningless."""
        if not torch.isfinite(self.logits).all():
            bad = int((~torch.isfinite(self.logits)).any(dim=1).sum())
            raise UserError(
                f"{what}: the model produced NaN or infinite logits for {bad} of {len(self)} "
                f"samples; check the checkpoint and the input normalisation"
            )
