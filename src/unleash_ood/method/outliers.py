"""Outlier exposure: OE, Energy-OE, POEM and DOE, each with plain CE or the UM loss on the
ID term (the constraint never touches the outlier term, as in the paper).

Every step forwards the ID batch and an outlier batch of ``aux_ratio`` times its size in one
concatenated pass, as the official code does, so BatchNorm sees both. Outliers are drawn
without replacement from a per-epoch permutation seeded by ``(seed, epoch)``, so resuming a run
reproduces the outliers an uninterrupted run would have seen.

* ``oe`` (Hendrycks et al. 2019): ``lambda * mean_out[logsumexp(f) - mean_k f_k]``, the
  cross-entropy of the outliers' softmax to the uniform distribution; lambda = 0.5.
* ``energy`` (Liu et al. 2020): ``lambda * [mean relu(E_in - m_in)^2 + mean relu(m_out - E_out)^2]``
  with ``E = -logsumexp(f)``; lambda = 0.1, m_in = -25, m_out = -7.
* ``poem`` (Ming et al. 2022): the energy loss on outliers re-selected every epoch by Thompson
  sampling (:mod:`unleash_ood.method.poem`).
* ``doe`` (Wang et al. 2023): the OE loss at a worst-case perturbation of the weights
  (:mod:`unleash_ood.method.doe`); lambda = 1, as DOE's own code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from unleash_ood.augment import augment
from unleash_ood.data.base import ImageSet
from unleash_ood.device import to_device
from unleash_ood.errors import UserError
from unleash_ood.method.constraint import um_loss
from unleash_ood.method.doe import Perturbation
from unleash_ood.method.losses import energy_margin_loss as energy_margin_loss
from unleash_ood.method.losses import oe_loss as oe_loss
from unleash_ood.method.poem import PoemSelector
from unleash_ood.rng import torch_generator
from unleash_ood.specs import DEFAULT_WEIGHT as DEFAULT_WEIGHT
from unleash_ood.specs import OUTLIER_METHODS as OUTLIER_METHODS
from unleash_ood.specs import OutlierSpec

# Maps (ID logits, labels) to the ID term: cross-entropy, or the UM loss on it.
IdLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def id_loss(xi: float | None) -> IdLoss:
    """Cross-entropy, or the UM loss ``|CE - xi| + xi`` when ``xi`` is given."""
    if xi is None:
        return F.cross_entropy
    return lambda logits, y: um_loss(F.cross_entropy(logits, y), xi)


class OutlierObjective:
    """A :class:`~unleash_ood.train.Trainer` objective adding an outlier term to the ID loss.

    The trainer calls :meth:`start_epoch` before each epoch (POEM re-selects its outliers
    there, DOE switches on after its warm-up) and then the objective once per step.
    """

    def __init__(
        self,
        spec: OutlierSpec,
        aux: ImageSet,
        xi: float | None,
        batch_size: int,
        epochs: int,
        augmentation: str,
        seed: int,
        id_train: ImageSet | None = None,
    ):
        spec.check()
        if len(aux) == 0:
            raise UserError("the auxiliary outlier set is empty; pass another --aux")
        self.spec, self.aux, self.id_loss = spec, aux, id_loss(xi)
        self.n_out = spec.aux_batch(batch_size)
        self.epochs, self.augmentation, self.seed = epochs, augmentation, seed
        self.id_train = id_train
        self.pool = torch.arange(len(aux))
        self.order = self.pool
        self.cursor = 0
        self.rank, self.world = 0, 1
        self.generator = torch.Generator()
        self.perturbation = None
        if spec.method == "poem":
            if id_train is None:
                raise ValueError("POEM needs the ID training set for its regression")
            self.selector = PoemSelector(spec.poem_keep, seed)

    @property
    def doe_active(self) -> bool:
        return self.spec.method == "doe" and self.perturbation is not None

    def start_epoch(self, epoch: int, model: nn.Module, rank: int = 0, world: int = 1) -> None:
        self.rank, self.world = rank, world
        self.generator = torch_generator(self.seed, "outliers", epoch)
        if self.spec.method == "poem":
            self.pool = self.selector.select(model, self.aux, self.id_train, epoch)
        if self.spec.method == "doe" and epoch >= round(self.spec.doe_warmup * self.epochs):
            self.perturbation = self.perturbation or Perturbation(model)
        self._reshuffle()

    def _reshuffle(self) -> None:
        self.order = self.pool[torch.randperm(len(self.pool), generator=self.generator)]
        self.cursor = 0

    def next_outliers(self, device: torch.device) -> torch.Tensor:
        """This process's share of the next global outlier batch, augmented like ID data."""
        index = []
        need = self.n_out
        while need:
            if self.cursor == len(self.order):
                self._reshuffle()
            take = self.order[self.cursor : self.cursor + need]
            self.cursor += len(take)
            need -= len(take)
            index.append(take)
        x, _ = self.aux.__getitems__(torch.cat(index))
        x = augment(x, self.augmentation, self.generator, padding=x.shape[-1] // 8)
        return to_device(x[self.rank :: self.world], device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs beyond the weights: POEM's buffer, DOE's direction."""
        state = {}
        if self.spec.method == "poem" and self.selector.history:
            state["poem_history"] = torch.stack(self.selector.history)
        if self.perturbation is not None:
            state.update(self.perturbation.state_dict())
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        if "poem_history" in state:
            self.selector.history = list(state["poem_history"].unbind())
        if any(k.startswith("doe_direction/") for k in state):
            self.perturbation = Perturbation(model)
            self.perturbation.load_state_dict(state)

    def aux_term(self, id_logits: torch.Tensor, out_logits: torch.Tensor) -> torch.Tensor:
        if self.spec.method in ("energy", "poem"):
            return energy_margin_loss(id_logits, out_logits, self.spec.m_in, self.spec.m_out)
        return oe_loss(out_logits)

    def __call__(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor):
        outliers = self.next_outliers(x.device)
        batch = torch.cat([x, outliers])
        n = x.shape[0]
        if self.doe_active:
            # The outlier term's gradient is taken at the perturbed weights and accumulated
            # here; the trainer adds the ID term's gradient at the unperturbed weights.
            self.perturbation.update(batch, n, self.generator)
            with self.perturbation.applied():
                logits = net(batch)
                (self.spec.lam * oe_loss(logits[n:])).backward()
            logits = net(batch)
            return self.id_loss(logits[:n], y), logits[:n]
        logits = net(batch)
        loss = self.id_loss(logits[:n], y) + self.spec.lam * self.aux_term(logits[:n], logits[n:])
        return loss, logits[:n]
