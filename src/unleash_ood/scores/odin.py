"""ODIN: temperature scaling plus a small input perturbation towards higher confidence."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unleash_ood.models.base import Classifier
from unleash_ood.scores.base import Scorer, check_range
from unleash_ood.scores.softmax import max_softmax


@dataclass
class ODIN(Scorer):
    """ODIN (Liang et al., ICLR 2018): MSP at a high temperature after one signed-gradient step
    on the input that raises the predicted class's softmax.

    The step helps ID inputs more than OOD ones, because ID inputs have larger input gradients
    of the confidence. Models take images in [0, 1] and normalise them internally, so
    ``epsilon`` is in pixel units: this is what the original code achieved by dividing the
    gradient by the normalisation std. As in the original, the perturbed image is not clipped
    to [0, 1].
    """

    name = "odin"
    needs_model = True
    temperature: float = 1000.0
    epsilon: float = 0.0014

    def __post_init__(self) -> None:
        check_range(self, "temperature", 0)
        check_range(self, "epsilon", 0, include_low=True)

    def score_batch(self, model: Classifier, x: torch.Tensor) -> torch.Tensor:
        # Gradient w.r.t. the input only: the model's parameters and mode are left untouched.
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            log_probs = F.log_softmax(model(x) / self.temperature, dim=1)
            (grad,) = torch.autograd.grad(log_probs.max(dim=1).values.sum(), x)
        with torch.no_grad():
            logits = model(x.detach() + self.epsilon * grad.sign())
        return max_softmax(logits.double() / self.temperature).cpu()
