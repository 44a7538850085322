"""Scores read off the logits alone: MSP, MaxLogit, Energy and GEN."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unleash_ood.outputs import Outputs
from unleash_ood.scores.base import Scorer, check_range


def max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Largest softmax probability per row, in float64."""
    return torch.softmax(logits.double(), dim=1).max(dim=1).values


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Negative free energy ``T * logsumexp(logits / T)`` per row, in float64."""
    return temperature * torch.logsumexp(logits.double() / temperature, dim=1)


@dataclass
class MSP(Scorer):
    """Maximum softmax probability, the baseline of Hendrycks & Gimpel (ICLR 2017).

    The official Unleashing Mask code applies softmax twice (``max(softmax(softmax(z)))``),
    which squashes every probability towards ``1 / C``; this is the plain, published MSP.
    """

    name = "msp"

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        return max_softmax(outputs.logits)


@dataclass
class MaxLogit(Scorer):
    """Maximum logit (Hendrycks et al., ICML 2022, "Scaling OOD detection to real-world
    settings"): unlike MSP it keeps the magnitude that softmax normalises away, which matters
    with many classes.
    """

    name = "maxlogit"

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        return outputs.logits.double().max(dim=1).values


@dataclass
class Energy(Scorer):
    """Negative free energy ``T * logsumexp(z / T)`` (Liu et al., NeurIPS 2020).

    It is proportional to the log-density the classifier implicitly models, without the
    normalisation that makes softmax confidence saturate.
    """

    name = "energy"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_range(self, "temperature", 0)

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        return energy(outputs.logits, self.temperature)


@dataclass
class GEN(Scorer):
    """Generalized entropy of the top-``m`` softmax probabilities (Liu et al., CVPR 2023, "GEN:
    Pushing the limits of softmax-based OOD detection").

    ``p^gamma (1 - p)^gamma`` with small ``gamma`` is far more sensitive to small deviations from
    a one-hot prediction than Shannon entropy, and keeping only the top ``m`` classes stops the
    long tail of tiny probabilities from drowning that signal when there are many classes.
    """

    name = "gen"
    gamma: float = 0.1
    m: int = 100

    def __post_init__(self) -> None:
        check_range(self, "gamma", 0)
        check_range(self, "m", 1, integer=True, include_low=True)

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        probs = torch.softmax(outputs.logits.double(), dim=1)
        top = probs.topk(min(self.m, probs.shape[1]), dim=1).values
        return -(top**self.gamma * (1 - top) ** self.gamma).sum(dim=1)
