"""The contract between the evaluator and every post-hoc OOD score.

Convention everywhere: a score is higher for more ID-like samples, so metrics never need to
know which score produced the numbers. Scores are ``(N,)`` float64 tensors on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.outputs import Outputs

if TYPE_CHECKING:
    from typing_extensions import Self

    from unleash_ood.models.base import Classifier


class Scorer:
    """Base of every score; subclasses are dataclasses whose init fields are the user params.

    Most scores are functions of one forward pass, so the evaluator computes :class:`Outputs`
    once and hands them to all of them. Scores with ``requires_fit`` first need statistics of
    the ID training set, kept in attributes ending with ``_``; scores with ``needs_model`` need
    input gradients and therefore the model and the images themselves.
    """

    name: ClassVar[str]
    requires_fit: ClassVar[bool] = False
    needs_model: ClassVar[bool] = False

    def fit(self, train: Outputs, head: nn.Linear) -> Self:
        raise TypeError(f"{self.name} has nothing to fit; call score directly")

    def score(self, outputs: Outputs, head: nn.Linear) -> torch.Tensor:
        raise TypeError(f"{self.name} needs input gradients; call score_batch(model, x)")

    def score_batch(self, model: Classifier, x: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{self.name} is computed from outputs; call score(outputs, head)")

    def _check_fitted(self) -> None:
        state = [f.name for f in dataclasses.fields(self) if f.name.endswith("_")]
        if any(getattr(self, name) is None for name in state):
            raise UserError(
                f"{self.name} must be fit on ID training outputs first: "
                f"call fit(train_outputs, head) before score"
            )


def check_range(
    scorer: Scorer,
    param: str,
    low: float,
    high: float = math.inf,
    *,
    integer: bool = False,
    include_low: bool = False,
) -> None:
    """Refuse a parameter outside ``(low, high)``, or ``[low, high)`` with ``include_low``."""
    value = getattr(scorer, param)
    kinds = (int,) if integer else (int, float)
    ok = (
        isinstance(value, kinds)
        and not isinstance(value, bool)
        and value < high
        and (low <= value if include_low else low < value)
    )
    if not ok:
        kind = "an integer" if integer else "a number"
        bounds = f"{'[' if include_low else '('}{low:g}, {high:g})"
        raise UserError(f"{scorer.name}: {param} must be {kind} in {bounds}, got {value!r}")


def head_params(head: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``(C, D)`` and bias ``(C,)`` of the head as float64 CPU tensors, detached."""
    weight = head.weight.detach().cpu().double()
    bias = (
        head.bias.detach().cpu().double()
        if head.bias is not None
        else weight.new_zeros(weight.shape[0])
    )
    return weight, bias
