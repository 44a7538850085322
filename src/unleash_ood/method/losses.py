"""The outlier terms of outlier exposure, shared by the objective and DOE's perturbation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def oe_loss(out_logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy from the outliers' softmax to the uniform distribution."""
    return (torch.logsumexp(out_logits, 1) - out_logits.mean(1)).mean()


def energy_margin_loss(
    id_logits: torch.Tensor, out_logits: torch.Tensor, m_in: float, m_out: float
) -> torch.Tensor:
    """Squared hinges that push ID energies below ``m_in`` and outlier energies above ``m_out``."""
    e_in = -torch.logsumexp(id_logits, 1)
    e_out = -torch.logsumexp(out_logits, 1)
    return F.relu(e_in - m_in).pow(2).mean() + F.relu(m_out - e_out).pow(2).mean()
