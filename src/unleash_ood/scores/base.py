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
    # The ID split ``fit`` takes: "train", or "val" for calibration-style statistics that an
    # over-fitted training set would distort (temperature scaling, KL-matching templates).
    fit_split: ClassVar[str] = "train"
    # Summaries of the model's last feature map this scorer reads from ``Outputs.summaries``
    # (names in ``models.maps.MAP_SUMMARIES``); the evaluator asks the model for its map only
    # when a scorer lists one.
    map_summaries: ClassVar[tuple[str, ...]] = ()

    def __setattr__(self, name: str, value: object) -> None:
        """Setting a parameter forgets the fitted state: statistics fitted under one value of
        a hyperparameter are never reused under another (call ``fit`` again)."""
        object.__setattr__(self, name, value)
        fields = {f.name: f for f in dataclasses.fields(self)}
        if name in fields and fields[name].init:
            for state in (n for n in fields if n.endswith("_")):
                object.__setattr__(self, state, None)
            if all(n in self.__dict__ for n in fields):  # a change after __init__: re-check
                self.__post_init__()

    def __post_init__(self) -> None:
        """Check the parameters; scorers with parameters override this."""

    def with_params(self, **params: object) -> Self:
        """An unfitted copy with some parameters changed (and checked)."""
        return dataclasses.replace(self, **params)

    def params(self) -> dict[str, object]:
        """The parameters and their current values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def fit_problem(self, n: int) -> str | None:
        """Why this scorer cannot be fit on ``n`` samples of its fit split (a neighbour count
        above the bank), or None: the evaluator asks before any forward pass, and ``fit``
        refuses with it."""
        return None

    def check_fit_size(self, n: int) -> None:
        """Refuse fitting on ``n`` samples with :meth:`fit_problem`'s reason."""
        problem = self.fit_problem(n)
        if problem is not None:
            raise UserError(f"{self.name}: {problem}")

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


def neighbour_count_problem(k: int, n: int, what: str = "ID training samples") -> str | None:
    """Why a search for the ``k``-th nearest of ``n`` ``what`` cannot run, or None
    (:meth:`Scorer.fit_problem` of the neighbour scorers)."""
    return f"k={k} is larger than the {n} {what}; use a smaller k" if k > n else None


def require_labels(scorer: Scorer, train: Outputs) -> None:
    """Refuse training outputs without class labels, for scorers that need them."""
    if bool((train.labels < 0).any()):
        raise UserError(
            f"{scorer.name} needs the class labels of the ID outputs it is fit on, but some are "
            f"-1 (no class); fit it on the labelled ID {scorer.fit_split} set"
        )


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean feature ``(num_classes, D)`` of each class, float64; zeros for an absent class."""
    x = features.double()
    sums = x.new_zeros(num_classes, x.shape[1]).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=num_classes).double().clamp_min(1)
    return sums / counts[:, None]


def check_range(
    scorer: Scorer,
    param: str,
    low: float,
    high: float = math.inf,
    *,
    integer: bool = False,
    include_low: bool = False,
    include_high: bool = False,
) -> None:
    """Refuse a parameter outside ``(low, high)``; ``include_low`` / ``include_high`` close
    that end of the interval."""
    value = getattr(scorer, param)
    kinds = (int,) if integer else (int, float)
    ok = (
        isinstance(value, kinds)
        and not isinstance(value, bool)
        and (value <= high if include_high else value < high)
        and (low <= value if include_low else low < value)
    )
    if not ok:
        kind = "an integer" if integer else "a number"
        bounds = f"{'[' if include_low else '('}{low:g}, {high:g}{']' if include_high else ')'}"
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
