"""Scores from the softmax probabilities: entropy, temperature scaling, KL matching, GradNorm."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from scipy.optimize import minimize_scalar
from torch import nn

from unleash_ood.outputs import Outputs
from unleash_ood.scores.base import Scorer, require_labels
from unleash_ood.scores.softmax import max_softmax

# Temperatures tried by temperature scaling: exp(-5) ... exp(5).
_LOG_T_BOUNDS = (-5.0, 5.0)


def probabilities(outputs: Outputs) -> torch.Tensor:
    return torch.softmax(outputs.logits.double(), dim=1)


@dataclass
class Entropy(Scorer):
    """Negative Shannon entropy of the softmax, ``sum_c p_c log p_c`` (the predictive-entropy
    baseline; e.g. Lakshminarayanan et al., NeurIPS 2017, for uncertainty). No parameters."""

    name = "entropy"

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        p = probabilities(outputs)
        return torch.xlogy(p, p).sum(dim=1)


@dataclass
class TempScale(Scorer):
    """Temperature scaling (Guo et al., ICML 2017, "On calibration of modern neural networks"):
    MSP of ``z / T``, with ``T`` the temperature that minimises the negative log-likelihood of
    the labelled ID **validation** outputs.

    Fitted on the ID validation split (as in OpenOOD), not the training split: a model that
    fits its training set (here to a loss of 0.02) would call for ``T < 1``. ``T`` is searched
    in log space over ``[e^-5, e^5]`` by a bounded scalar minimiser, where OpenOOD runs LBFGS
    from ``T = 1.5``; both find the same convex minimum.
    """

    name = "tempscale"
    requires_fit = True
    fit_split = "val"
    temperature_: float | None = field(default=None, init=False)

    def fit(self, train: Outputs, head: nn.Linear) -> TempScale:
        require_labels(self, train)
        logits, labels = train.logits.double(), train.labels

        def nll(log_t: float) -> float:
            scaled = logits / math.exp(log_t)
            return float(torch.nn.functional.cross_entropy(scaled, labels))

        log_t = minimize_scalar(nll, bounds=_LOG_T_BOUNDS, method="bounded").x
        self.temperature_ = math.exp(log_t)
        return self

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()
        return max_softmax(outputs.logits.double() / self.temperature_)


@dataclass
class KLM(Scorer):
    """KL matching (Hendrycks et al., ICML 2022, "Scaling out-of-distribution detection for
    real-world settings"): ``-min_k KL(p(x) || d_k)``, with template ``d_k`` the mean softmax of
    the ID validation samples predicted as class ``k``.

    Unlike MSP it looks at the whole predicted distribution, which matters when classes are
    similar and ID predictions are rarely one-hot. Templates come from the ID validation
    split, as in the paper and OpenOOD (no labels needed); a class nothing is predicted as
    gets the one-hot template, as in OpenOOD. No hyperparameters.
    """

    name = "klm"
    requires_fit = True
    fit_split = "val"
    templates_: torch.Tensor | None = field(default=None, init=False, repr=False)

    def fit(self, train: Outputs, head: nn.Linear) -> KLM:
        p = probabilities(train)
        classes = p.shape[1]
        pred = p.argmax(dim=1)
        sums = p.new_zeros(classes, classes).index_add_(0, pred, p)
        counts = torch.bincount(pred, minlength=classes).double()
        templates = sums / counts.clamp_min(1)[:, None]
        self.templates_ = torch.where(counts[:, None] > 0, templates, torch.eye(classes).double())
        return self

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        self._check_fitted()
        p = probabilities(outputs)
        neg_entropy = torch.xlogy(p, p).sum(dim=1)
        # KL(p || d_k) = sum p log p - sum p log d_k; xlogy gives 0 where p = 0.
        kl = torch.stack([neg_entropy - torch.xlogy(p, d).sum(dim=1) for d in self.templates_])
        return -kl.min(dim=0).values


@dataclass
class GradNorm(Scorer):
    """GradNorm (Huang, Geng & Li, NeurIPS 2021, "On the importance of gradients for detecting
    distributional shifts in the wild"): the L1 norm of the gradient, with respect to the head's
    weight, of the KL divergence between the uniform distribution and the softmax.

    With logits ``f = W z + b`` and ``L = KL(u || softmax(f))``, ``dL/dW = (p - u) z^T``, so

        score(x) = ||dL/dW||_1 = (sum_c |p_c - 1 / C|) * ||z||_1

    exactly: the paper's gradient (last layer, temperature 1) in closed form from the features
    and logits, with no backward pass. OpenOOD and the authors' code run one backward pass per
    sample through the head for the same number (times ``C``, from a target of ones, which
    does not change the ranking). No parameters.
    """

    name = "gradnorm"

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        p = probabilities(outputs)
        spread = (p - 1 / p.shape[1]).abs().sum(dim=1)
        return spread * outputs.features.double().abs().sum(dim=1)
