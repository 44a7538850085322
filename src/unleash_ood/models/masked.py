"""UMAP, "Unleashing Mask Adopt Pruning": learn a binary mask over a frozen pretrained network.

Unleashing Mask (Zhu et al., ICML 2023) proposes, besides fine-tuning the weights, to keep the
well-trained weights ``W`` fixed and to learn which of them to drop. It uses edge-popup
(Ramanujan et al., CVPR 2020, "What's hidden in a randomly weighted neural network?"): every
conv / linear weight gets a score ``s``; the layer computes with ``W * m``, where ``m`` is 1 for
the ``k = round(keep * numel)`` weights of largest ``|s|`` *within that layer* (``keep = 0.8`` in
the official code) and 0 elsewhere. Top-k is not differentiable, so the backward pass is
straight-through: the gradient w.r.t. the mask is passed to the scores unchanged.

Workflow: load the pretrained weights, :func:`apply_umap`, optimise :func:`score_parameters`
with the UM loss, then :func:`export_dense` to get an ordinary model of the original
architecture (weights ``W * m``) that the rest of the library loads without any UMAP code.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.rng import torch_generator

__all__ = [
    "MaskedConv2d",
    "MaskedLinear",
    "TopKMask",
    "apply_umap",
    "export_dense",
    "mask_sparsity",
    "score_parameters",
]

OVERALL = "overall"


class TopKMask(torch.autograd.Function):
    """``mask = TopKMask.apply(scores, k)``: 1 at the ``k`` entries of largest ``|score|``.

    Ties are broken by flattened index (a stable sort), so the mask is deterministic and has
    exactly ``k`` ones. The backward pass is edge-popup's straight-through estimator:
    ``grad_scores = grad_mask``, so with ``w_eff = W * mask`` the scores receive
    ``dL/dw_eff * W`` for every weight, kept or not, and a pruned weight can "pop up" again.
    """

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, k: int) -> torch.Tensor:
        flat = scores.detach().abs().flatten()
        order = torch.sort(flat, descending=True, stable=True).indices
        mask = torch.zeros_like(flat)
        mask[order[:k]] = 1
        return mask.view_as(scores)

    @staticmethod
    def backward(ctx: Any, grad_mask: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_mask, None


def kept_count(keep: float, numel: int) -> int:
    """Weights a layer of ``numel`` weights keeps: ``round(keep * numel)``, at least one.

    The official ``GetSubnet`` keeps ``numel - int((1 - keep) * numel)``, which floating point
    makes one more for some sizes (4148 of 5184 at keep 0.8, where this keeps 4147)."""
    return max(1, round(keep * numel))


def _check_keep(keep: float) -> float:
    if not 0 < keep <= 1:
        raise UserError(f"keep is the fraction of weights UMAP keeps, in (0, 1]; got {keep!r}")
    return float(keep)


class _MaskedWeight:
    """The edge-popup part shared by :class:`MaskedConv2d` and :class:`MaskedLinear`.

    The layer holds the pretrained ``weight`` and ``bias`` and a ``scores`` parameter of the
    weight's shape. Only the weight is masked, as in the paper: biases are a negligible share of
    the parameters and stay as trained.

    The mask is taken over ``|scores|`` *through* ``abs`` (as the official edge-popup code
    does, via its ``scores.abs()``), so a score receives ``dL/dw_eff * W * sign(s)``: gradient
    descent then grows ``|s|`` of a helpful weight whatever the sign of ``s``. Without the
    ``sign(s)`` factor half of the kaiming-initialised scores, the negative ones, would move
    the wrong way.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    _dense_type: ClassVar[type[nn.Module]]

    def __init__(
        self,
        *args: Any,
        keep: float = 0.8,
        train_weights: bool = False,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self._init_mask(keep, train_weights, generator)

    def _init_mask(self, keep: float, train_weights: bool, generator: torch.Generator | None):
        """Fresh scores, kaiming-uniform with ``a = sqrt(5)`` as in the official code (the
        default init of ``nn.Conv2d`` / ``nn.Linear`` weights). They are drawn on the CPU so a
        seed gives the same scores on every device."""
        self.keep = _check_keep(keep)
        scores = torch.empty(self.weight.shape, dtype=self.weight.dtype)
        nn.init.kaiming_uniform_(scores, a=math.sqrt(5), generator=generator)
        self.scores = nn.Parameter(scores.to(self.weight.device))
        self.set_train_weights(train_weights)

    @classmethod
    def from_dense(
        cls,
        dense: nn.Module,
        keep: float = 0.8,
        train_weights: bool = False,
        generator: torch.Generator | None = None,
    ) -> _MaskedWeight:
        """A masked layer computing with ``dense``'s own weight and bias tensors (shared)."""
        layer = cls(**cls._hyperparameters(dense), device="meta", keep=keep)  # no real init
        layer.weight, layer.bias = dense.weight, dense.bias
        layer._init_mask(keep, train_weights, generator)
        return layer

    @staticmethod
    def _hyperparameters(layer: nn.Module) -> dict[str, Any]:
        """Constructor arguments that rebuild ``layer``'s shape and behaviour."""
        raise NotImplementedError

    def set_train_weights(self, train_weights: bool) -> None:
        """Whether weight and bias train along with the scores (they are frozen by default)."""
        self.train_weights = train_weights
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(train_weights)

    @property
    def k(self) -> int:
        return kept_count(self.keep, self.weight.numel())

    def mask(self) -> torch.Tensor:
        return TopKMask.apply(self.scores.abs(), self.k)

    def effective_weight(self) -> torch.Tensor:
        return self.weight * self.mask()

    def to_dense(self) -> nn.Module:
        """The plain layer with weight ``W * m`` baked in (a copy; this layer is unchanged)."""
        dense = self._dense_type(
            **self._hyperparameters(self), device="meta", dtype=self.weight.dtype
        )
        dense.weight = nn.Parameter(self.effective_weight().detach().clone())
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.detach().clone())
        return dense

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, keep={self.keep}, train_weights={self.train_weights}"


class MaskedConv2d(_MaskedWeight, nn.Conv2d):
    """``nn.Conv2d`` computing with ``weight * TopKMask(|scores|, k)`` (see :class:`TopKMask`)."""

    _dense_type = nn.Conv2d

    @staticmethod
    def _hyperparameters(layer: nn.Conv2d) -> dict[str, Any]:
        return {
            "in_channels": layer.in_channels,
            "out_channels": layer.out_channels,
            "kernel_size": layer.kernel_size,
            "stride": layer.stride,
            "padding": layer.padding,
            "dilation": layer.dilation,
            "groups": layer.groups,
            "bias": layer.bias is not None,
            "padding_mode": layer.padding_mode,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nn.Conv2d's own F.conv2d call, which also honours non-zero padding modes.
        return self._conv_forward(x, self.effective_weight(), self.bias)


class MaskedLinear(_MaskedWeight, nn.Linear):
    """``nn.Linear`` computing with ``weight * TopKMask(|scores|, k)`` (see :class:`TopKMask`)."""

    _dense_type = nn.Linear

    @staticmethod
    def _hyperparameters(layer: nn.Linear) -> dict[str, Any]:
        return {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bias": layer.bias is not None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


# Exact types only: subclasses may compute differently (MultiheadAttention's out_proj is an
# nn.Linear subclass whose weight is read directly, so a mask on it would be silently ignored).
_MASKED_TYPES: dict[type[nn.Module], type[_MaskedWeight]] = {
    nn.Conv2d: MaskedConv2d,
    nn.Linear: MaskedLinear,
}


def _replace_layers(
    model: nn.Module, convert: dict[type[nn.Module], Callable[[Any], nn.Module]]
) -> nn.Module:
    """Swap every submodule whose exact type is in ``convert`` for ``convert[type](module)``.

    A module shared by several parents is converted once, so it stays shared.
    """
    if type(model) in convert:
        return convert[type(model)](model)
    done: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in convert:
                if id(child) not in done:
                    done[id(child)] = convert[type(child)](child)
                setattr(parent, name, done[id(child)])
    return model


def apply_umap(
    model: nn.Module, keep: float = 0.8, train_weights: bool = False, seed: int | None = None
) -> nn.Module:
    """Replace every ``nn.Conv2d`` and ``nn.Linear`` of ``model``, in place, by its masked twin.

    The masked layers compute with the original weight and bias tensors, so load the pretrained
    weights *before* calling this. A classifier's ``head`` becomes a :class:`MaskedLinear`, and
    ``model.head(model.features(x))`` still works. ``seed`` makes the score initialisation
    reproducible (layers are initialised in module order).

    With ``train_weights=False`` (UMAP as in the paper) every parameter except the scores is
    frozen, BatchNorm's affine weight and bias included: the method learns only *which*
    pretrained weights to keep, and freezing BN is the faithful choice for a pretrained
    network (edge-popup itself uses non-affine BN). BN *running statistics* are buffers, not
    parameters: they still update whenever the model is in train mode (a plain ``model.train()``
    loop, which re-estimates them for the masked network). A trainer that wants the pretrained
    statistics kept must put the BN layers in eval mode itself. With ``train_weights=True``
    every parameter trains (weights, biases, BN affine and scores).
    """
    keep = _check_keep(keep)
    generator = torch_generator(seed, "mask-scores") if seed is not None else None
    for p in model.parameters():
        p.requires_grad_(train_weights)

    convert = {
        dense: partial(kind.from_dense, keep=keep, train_weights=train_weights, generator=generator)
        for dense, kind in _MASKED_TYPES.items()
    }
    return _replace_layers(model, convert)


def _masked_layers(model: nn.Module) -> list[tuple[str, _MaskedWeight]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _MaskedWeight)]


def score_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The scores of every masked layer: what an optimiser trains for UMAP.

    With ``apply_umap(..., train_weights=True)`` use
    ``[p for p in model.parameters() if p.requires_grad]`` instead, which adds the weights.
    """
    return [layer.scores for _, layer in _masked_layers(model)]


def export_dense(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every masked layer baked into a plain ``nn.Conv2d`` /
    ``nn.Linear`` holding ``W * m``; the masked ``model`` is left intact.

    The result has exactly the original architecture's state-dict keys, so it is saved and
    loaded like any model of that architecture, and gives the masked model's logits. All its
    parameters are trainable again, as in a freshly built model.
    """
    dense = _replace_layers(
        copy.deepcopy(model), {kind: kind.to_dense for kind in _MASKED_TYPES.values()}
    )
    for p in dense.parameters():
        p.requires_grad_(True)
    return dense


def _sparsity_entry(total: int, kept: int) -> dict[str, float | int]:
    return {"total": total, "kept": kept, "fraction": kept / total}


@torch.no_grad()
def mask_sparsity(model: nn.Module) -> dict[str, dict[str, float | int]]:
    """The achieved mask of every masked layer: ``{name: {total, kept, fraction}}`` plus an
    ``"overall"`` entry over all masked weights (biases and other parameters not counted)."""
    report = {
        name: _sparsity_entry(layer.weight.numel(), int(layer.mask().sum().item()))
        for name, layer in _masked_layers(model)
    }
    total = sum(int(entry["total"]) for entry in report.values())
    kept = sum(int(entry["kept"]) for entry in report.values())
    if total:
        report[OVERALL] = _sparsity_entry(total, kept)
    return report
