"""POEM's outlier mining (Ming et al., ICML 2022): Thompson sampling on a Bayesian linear
regression over penultimate features.

Before every epoch a linear model ``z -> beta . z`` is fitted to tell ID features (target
``-conf``) from the features of recently selected outliers (target ``+conf``), with the
Gaussian prior ``N(0, prior_var I)`` and noise variance ``noise_var``. One ``beta`` is drawn
from its posterior and the outliers with the smallest ``|beta . z|``, those nearest the sampled
boundary, are kept for the epoch.

Differences from the official code, each deliberate: the posterior is sampled through a
Cholesky factor of its precision (the code's ``torch.symeig`` no longer exists in PyTorch 2);
its covariance is the true posterior ``A^-1`` rather than ``prior_var * A^-1``; features are
recomputed with the current model for every fit, including the buffer of outliers kept over
the last ``BUFFER_EPOCHS`` epochs; every draw is seeded.
"""

from __future__ import annotations

import torch
from torch import nn

from unleash_ood.data.base import ImageData, ImageSet
from unleash_ood.method.outliers import EnergyOE, register
from unleash_ood.outputs import forward_outputs
from unleash_ood.rng import torch_generator

PRIOR_VAR = 20.0
NOISE_VAR = 0.5
CONF = 3.0  # POEM's regression target magnitude
BUFFER_EPOCHS = 4


def posterior(
    z: torch.Tensor, y: torch.Tensor, prior_var: float = PRIOR_VAR, noise_var: float = NOISE_VAR
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and Cholesky factor ``L`` of the precision ``A = L L^T`` of the weight posterior."""
    z, y = z.double(), y.double()
    precision = z.T @ z / noise_var + torch.eye(z.shape[1], dtype=z.dtype) / prior_var
    chol = torch.linalg.cholesky(precision)
    mean = torch.cholesky_solve((z.T @ y / noise_var)[:, None], chol)[:, 0]
    return mean, chol


def thompson_sample(mean: torch.Tensor, chol: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One draw from ``N(mean, A^-1)``: ``mean + L^-T eps`` has covariance ``(L L^T)^-1``."""
    eps = torch.randn(mean.shape[0], 1, generator=g, dtype=mean.dtype)
    return mean + torch.linalg.solve_triangular(chol.T, eps, upper=True)[:, 0]


class PoemSelector:
    """Keeps ``keep`` of the auxiliary pool each epoch (the official code: 50k of 400k)."""

    def __init__(self, keep: float, seed: int):
        self.keep, self.seed = keep, seed
        self.history: list[torch.Tensor] = []
        self.boundary: torch.Tensor | None = None  # the last sampled weights, for inspection

    def select(
        self, model: nn.Module, aux: ImageSet, id_train: ImageData, epoch: int, workers: int = 0
    ) -> torch.Tensor:
        """The indices into ``aux`` kept for epoch ``epoch``; ``workers`` processes decode
        the ID sample when ``id_train`` is streamed."""
        g = torch_generator(self.seed, "poem-select", epoch)
        n_keep = max(1, round(self.keep * len(aux)))
        device = next(model.parameters()).device
        z_aux = forward_outputs(model, aux, device).features
        id_index = torch.randperm(len(id_train), generator=g)[: min(n_keep, len(id_train))]
        z_id = forward_outputs(model, id_train.subset(id_index), device, workers=workers).features
        # Before the first selection the buffer holds a random draw from the pool.
        recent = self.history[-BUFFER_EPOCHS:] or [torch.randperm(len(aux), generator=g)[:n_keep]]
        z_out = z_aux[torch.cat(recent)]
        z = torch.cat([z_id, z_out])
        y = torch.cat([torch.full((len(z_id),), -CONF), torch.full((len(z_out),), CONF)])
        beta = self.boundary = thompson_sample(*posterior(z, y), g)
        distance = (z_aux.double() @ beta).abs()
        chosen = torch.sort(torch.topk(distance, n_keep, largest=False).indices).values
        self.history.append(chosen)
        return chosen


@register("poem")
class Poem(EnergyOE):
    """POEM: the Energy-OE loss on the outliers :class:`PoemSelector` keeps before every epoch.

    Its buffer of recent selections is saved for ``--resume``.
    """

    def setup(self) -> None:
        if self.id_train is None:
            raise ValueError("POEM needs the ID training set for its regression")
        self.selector = PoemSelector(self.spec.poem_keep, self.seed)

    def start_epoch(self, epoch: int, model: nn.Module, rank: int = 0, world: int = 1) -> None:
        self.stream.pool = self.selector.select(
            model, self.stream.aux, self.id_train, epoch, self.workers
        )
        super().start_epoch(epoch, model, rank, world)

    def state_dict(self) -> dict[str, torch.Tensor]:
        history = self.selector.history
        return {"poem_history": torch.stack(history)} if history else {}

    def load_state_dict(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        if "poem_history" in state:
            self.selector.history = list(state["poem_history"].unbind())
