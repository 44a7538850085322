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
* ``woods`` / ``scone``: wild data instead of clean outliers (:mod:`unleash_ood.method.wild`).

OE and Energy-OE are defined here; every other method is one class in its own module,
registered with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unleash_ood.augment import augment
from unleash_ood.data.auxiliary import check_aux, load_aux
from unleash_ood.data.base import Benchmark, ImageData
from unleash_ood.data.streaming import load_batches
from unleash_ood.device import to_device
from unleash_ood.errors import UserError
from unleash_ood.method.constraint import um_loss
from unleash_ood.method.losses import energy_margin_loss as energy_margin_loss
from unleash_ood.method.losses import oe_loss as oe_loss
from unleash_ood.rng import torch_generator
from unleash_ood.specs import DEFAULT_WEIGHT as DEFAULT_WEIGHT
from unleash_ood.specs import OUTLIER_METHODS as OUTLIER_METHODS
from unleash_ood.specs import OutlierSpec
from unleash_ood.train import Objective, Recipe

# Maps (ID logits, labels) to the ID term: cross-entropy, or the UM loss on it.
IdLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def id_loss(xi: float | None) -> IdLoss:
    """Cross-entropy, or the UM loss ``|CE - xi| + xi`` when ``xi`` is given."""
    if xi is None:
        return F.cross_entropy
    return lambda logits, y: um_loss(F.cross_entropy(logits, y), xi)


class OutlierStream:
    """Outlier batches of a fixed size from ``aux``: a per-epoch permutation of a pool (all of
    ``aux`` unless a method narrows it, as POEM does), drawn without replacement, augmented like
    ID data, each process of a ``torchrun`` job taking its share of the global batch.

    With ``workers``, the batches that lie wholly inside the current permutation are fetched
    ahead in that many processes (decoded there when ``aux`` streams files, as WOODS's wild mix
    of streamed ID images does); a batch that wraps into the next permutation is fetched here.
    Which images a batch holds, and their augmentation, are the same either way.
    """

    def __init__(self, aux: ImageData, n_out: int, augmentation: str, seed: int, workers: int = 0):
        if len(aux) == 0:
            raise UserError("the auxiliary outlier set is empty; pass another --aux")
        self.aux, self.n_out, self.augmentation, self.seed = aux, n_out, augmentation, seed
        self.workers = workers
        self.pool = torch.arange(len(aux))
        self.order, self.cursor = self.pool, 0
        self.ahead: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.rank, self.world = 0, 1
        self.generator = torch.Generator()

    def start_epoch(self, epoch: int, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.generator = torch_generator(self.seed, "outliers", epoch)
        self._reshuffle()

    def _reshuffle(self) -> None:
        self.order = self.pool[torch.randperm(len(self.pool), generator=self.generator)]
        self.cursor = 0
        self.ahead = None  # its batches were of the previous permutation

    def _fetch_ahead(self, pin_memory: bool) -> torch.Tensor:
        """The batch at the cursor, from the loader of the current permutation's batches."""
        if self.ahead is None:
            order, n = self.order, self.n_out
            index = (order[s : s + n] for s in range(self.cursor, len(order) - n + 1, n))
            self.ahead = load_batches(self.aux, index, self.workers, pin_memory)
        self.cursor += self.n_out
        return next(self.ahead)[0]

    def _fetch_here(self) -> torch.Tensor:
        """The batch at the cursor, continued from a fresh permutation where this one ends."""
        index = []
        need = self.n_out
        while need:
            if self.cursor == len(self.order):
                self._reshuffle()
            take = self.order[self.cursor : self.cursor + need]
            self.cursor += len(take)
            need -= len(take)
            index.append(take)
        return self.aux.__getitems__(torch.cat(index))[0]

    def next(self, device: torch.device) -> torch.Tensor:
        """This process's share of the next global outlier batch."""
        if self.workers and self.cursor + self.n_out <= len(self.order):
            x = self._fetch_ahead(pin_memory=device.type == "cuda")
        else:
            x = self._fetch_here()
        x = augment(x, self.augmentation, self.generator, padding=x.shape[-1] // 8)
        return to_device(x[self.rank :: self.world], device)


# Outlier-exposure methods by name (``--outliers``); each method's module registers its class.
OUTLIER_OBJECTIVES: dict[str, type[OutlierObjective]] = {}


def register(*methods: str) -> Callable[[type[OutlierObjective]], type[OutlierObjective]]:
    """Class decorator: ``--outliers NAME`` builds this class for each of ``methods``."""

    def add(cls: type[OutlierObjective]) -> type[OutlierObjective]:
        for method in methods:
            OUTLIER_OBJECTIVES[method] = cls
        return cls

    return add


def outlier_class(method: str) -> type[OutlierObjective]:
    if method not in OUTLIER_OBJECTIVES:
        raise UserError(
            f"unknown outlier method {method!r}; choose {', '.join(OUTLIER_OBJECTIVES)}"
        )
    return OUTLIER_OBJECTIVES[method]


class OutlierObjective(Objective):
    """The ID term (CE, or UM at ``xi``) plus ``lambda`` times an outlier term, from one
    concatenated forward pass of the ID batch and a batch of the :class:`OutlierStream`.

    A method subclasses this with its :meth:`aux_term` (and hooks where it needs them) and
    registers itself (:func:`register`), so a new method is one small class in one file.
    ``OutlierObjective(spec, ...)`` itself builds the class registered for ``spec.method``.
    """

    def __new__(cls, spec: OutlierSpec, *args, **kwargs):
        if cls is OutlierObjective:
            cls = outlier_class(spec.method)
        return super().__new__(cls)

    def __init__(
        self,
        spec: OutlierSpec,
        aux: ImageData,
        xi: float | None,
        batch_size: int,
        epochs: int,
        augmentation: str,
        seed: int,
        id_train: ImageData | None = None,
        workers: int = 0,
    ):
        spec.check()
        self.spec, self.id_loss, self.epochs, self.id_train = spec, id_loss(xi), epochs, id_train
        self.seed, self.workers = seed, workers  # for passes over streamed data
        n_out = spec.aux_batch(batch_size)
        self.stream = OutlierStream(aux, n_out, augmentation, seed, workers)
        self.setup()

    def setup(self) -> None:
        """What a method prepares beyond the shared state (POEM: its selector)."""

    @classmethod
    def check_source(cls, spec: OutlierSpec) -> None:
        """Refuse an unreadable outlier source before xi is estimated or anything trained."""
        check_aux(spec.aux)

    @classmethod
    def outlier_source(cls, spec: OutlierSpec, benchmark: Benchmark, recipe: Recipe) -> Any:
        """What the method draws its outlier batches from: ``--aux``'s images."""
        c, h, _ = benchmark.image_shape
        return load_aux(spec.aux, h, c, spec.aux_size, recipe.seed)

    @classmethod
    def build(
        cls,
        spec: OutlierSpec,
        benchmark: Benchmark,
        recipe: Recipe,
        xi: float | None,
        workers: int = 0,
    ) -> OutlierObjective:
        """The objective of ``spec`` for a fine-tune of ``recipe`` on ``benchmark``; its
        passes over the ID training data decode streamed images in ``workers`` processes."""
        source = cls.outlier_source(spec, benchmark, recipe)
        return cls(
            spec,
            source,
            xi,
            recipe.batch_size,
            recipe.epochs,
            recipe.augment,
            recipe.seed,
            benchmark.id_train,
            workers=workers,
        )

    def start_epoch(self, epoch: int, model: nn.Module, rank: int = 0, world: int = 1) -> None:
        self.stream.start_epoch(epoch, rank, world)

    def aux_term(self, id_logits: torch.Tensor, out_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor):
        outliers = self.stream.next(x.device)
        n = x.shape[0]
        logits = net(torch.cat([x, outliers]))
        loss = self.id_loss(logits[:n], y) + self.spec.lam * self.aux_term(logits[:n], logits[n:])
        return loss, logits[:n]


@register("oe")
class OE(OutlierObjective):
    """Outlier exposure (Hendrycks et al., ICLR 2019): cross-entropy of the outliers' softmax
    to the uniform distribution."""

    def aux_term(self, id_logits: torch.Tensor, out_logits: torch.Tensor) -> torch.Tensor:
        return oe_loss(out_logits)


@register("energy")
class EnergyOE(OutlierObjective):
    """Energy-bounded learning (Liu et al., NeurIPS 2020): squared hinges keeping ID energies
    below ``m_in`` and outlier energies above ``m_out``."""

    def aux_term(self, id_logits: torch.Tensor, out_logits: torch.Tensor) -> torch.Tensor:
        return energy_margin_loss(id_logits, out_logits, self.spec.m_in, self.spec.m_out)
