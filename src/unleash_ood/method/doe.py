"""DOE's implicit outlier transformation (Wang et al., ICLR 2023): the OE loss is minimised at a
worst-case perturbation of the weights, which acts like training on transformed outliers.

Each step after the warm-up, as DOE's own code does:

1. ``gamma`` is drawn from {1e-1, 1e-2, 1e-3, 1e-4};
2. with the logits multiplied by a scalar ``s = 1``, the surrogate ``(d L_OE / d s)^2`` is
   differentiated with respect to every conv/linear weight, and one step down that gradient,
   rescaled per layer to the layer's own norm, is the new direction;
3. the direction is smoothed over steps (``0.6 * previous + 0.4 * new``);
4. the OE gradient is taken at ``W + gamma * direction``, then the weights are restored.

DOE's code then steps twice per batch (OE at the perturbed weights, CE after restoring); here
both gradients enter one optimiser step, ``grad L_OE(W + gamma d) + grad L_ID(W)``, the usual
form of adversarial weight perturbation, so DOE runs in the same training loop as every other
method. The extra forward passes leave BatchNorm's running statistics alone.

Other deviations from that code (as the Unleashing Mask code runs it,
``utils/neural_linear_opt.py``, ``train_doe``): the direction is the rescaled gradient itself,
where theirs is the rescaled step of a proxy copy's own optimiser (their ``get_optimizer``:
the training SGD, with momentum that carries over between batches, and weight decay); and
their optimiser steps clip the gradient norm to 1 (``clip_grad_norm_``), where the single
step here is not clipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from unleash_ood.method.losses import oe_loss
from unleash_ood.method.outliers import OE, register

GAMMAS = (1e-1, 1e-2, 1e-3, 1e-4)
SMOOTHING = 0.6


def perturbed_weights(model: nn.Module) -> list[nn.Parameter]:
    """Conv and linear weight tensors (biases and normalisation layers are left alone)."""
    return [p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1]


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm that normalises with batch statistics but updates no running ones."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked) for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
        if m.num_batches_tracked is not None:
            m.num_batches_tracked = m.num_batches_tracked.clone()
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved, strict=True):
            m.momentum, m.num_batches_tracked = momentum, tracked


def surrogate_direction(
    model: nn.Module, weights: list[nn.Parameter], batch: torch.Tensor, n_id: int
) -> list[torch.Tensor]:
    """One descent step on ``(d L_OE / d s)^2``, each layer rescaled to the weight's norm."""
    frozen = [w for w in weights if not w.requires_grad]  # e.g. UMAP's fixed weights
    for w in frozen:
        w.requires_grad_(True)
    try:
        with frozen_bn_stats(model):
            scale = torch.ones((), device=batch.device, requires_grad=True)
            loss = oe_loss((model(batch) * scale)[n_id:])
            (d_scale,) = torch.autograd.grad(loss, scale, create_graph=True)
            grads = torch.autograd.grad(d_scale.pow(2), weights, allow_unused=True)
    finally:
        for w in frozen:
            w.requires_grad_(False)
    direction = []
    for w, g in zip(weights, grads, strict=True):
        g = torch.zeros_like(w) if g is None else g
        direction.append(-g * (w.detach().norm() / (g.norm() + 1e-20)))
    if dist.is_initialized() and dist.get_world_size() > 1:
        for d in direction:  # every process must perturb its replica identically
            dist.all_reduce(d)
            d /= dist.get_world_size()
    return direction


class Perturbation:
    """The smoothed worst-case direction of one model and the ``gamma`` of the current step."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.weights = perturbed_weights(model)
        self.direction: list[torch.Tensor] | None = None
        self.gamma = 0.0

    def update(self, batch: torch.Tensor, n_id: int, g: torch.Generator) -> None:
        self.gamma = GAMMAS[int(torch.randint(len(GAMMAS), (), generator=g))]
        new = surrogate_direction(self.model, self.weights, batch, n_id)
        if self.direction is None:
            self.direction = new
        else:
            pairs = zip(self.direction, new, strict=True)
            self.direction = [SMOOTHING * d + (1 - SMOOTHING) * n for d, n in pairs]

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model at ``W + gamma * direction`` inside the block, exactly ``W`` after it."""
        saved = [w.detach().clone() for w in self.weights]
        with torch.no_grad():
            for w, d in zip(self.weights, self.direction, strict=True):
                w.add_(d, alpha=self.gamma)
        try:
            with frozen_bn_stats(self.model):
                yield
        finally:
            with torch.no_grad():
                for w, original in zip(self.weights, saved, strict=True):
                    w.copy_(original)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.direction is None:
            return {}
        return {f"doe_direction/{i}": d.detach().cpu() for i, d in enumerate(self.direction)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self.direction = [
                state[f"doe_direction/{i}"].to(w.device) for i, w in enumerate(self.weights)
            ]


@register("doe")
class Doe(OE):
    """DOE: OE whose outlier gradient is taken at the :class:`Perturbation` of the weights,
    switched on after ``doe_warmup`` of the epochs. The smoothed direction is saved for
    ``--resume``."""

    perturbation: Perturbation | None = None

    @property
    def doe_active(self) -> bool:
        return self.perturbation is not None

    def start_epoch(self, epoch: int, model: nn.Module, rank: int = 0, world: int = 1) -> None:
        super().start_epoch(epoch, model, rank, world)
        if epoch >= round(self.spec.doe_warmup * self.epochs):
            self.perturbation = self.perturbation or Perturbation(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.perturbation.state_dict() if self.perturbation is not None else {}

    def load_state_dict(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        if any(k.startswith("doe_direction/") for k in state):
            self.perturbation = Perturbation(model)
            self.perturbation.load_state_dict(state)

    def __call__(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor):
        if self.perturbation is None:  # still warming up: plain OE
            return super().__call__(net, x, y)
        batch = torch.cat([x, self.stream.next(x.device)])
        n = x.shape[0]
        # The outlier term's gradient is taken at the perturbed weights and accumulated here;
        # the trainer adds the ID term's gradient at the unperturbed weights.
        self.perturbation.update(batch, n, self.stream.generator)
        with self.perturbation.applied():
            logits = net(batch)
            (self.spec.lam * oe_loss(logits[n:])).backward()
        logits = net(batch)
        return self.id_loss(logits[:n], y), logits[:n]
