"""DiffPath (Heng, Thiery, Soh, NeurIPS 2024, "Out-of-Distribution Detection with a Single
Unconditional Diffusion Model"; code clear-nus/diffpath ``save_train_statistics.py``,
``eval_6d.py``).

One unconditional diffusion model (:mod:`unleash_ood.generative.diffusion`), trained on a base
set unrelated to the ID task, inverts each image with ``steps`` (10) DDIM steps. Along the
path, the noise predictions ``eps_i`` are its rate of change and
``d_i = (eps_{i+1} - eps_i) * steps`` its curvature. The six statistics, each summed over the
steps and every pixel and channel, are

    (sum eps, sum eps^2, sum eps^3, sum d, sum d^2, sum d^3)

(the authors' "6D" variant). A Gaussian mixture on standardised statistics of ID training
images gives the score: its log-density (higher = more ID-like).

Deviations: the authors grid-search the mixture (50 or 100 components, four covariance types,
10-fold cross-validation); here ``components`` and ``covariance`` are parameters (default 50,
``full``) fitted once with ``random_state=0`` on ``samples`` ID training images (the first ones).
The paper's base sets are CelebA or ImageNet; no 28x28 grey set unrelated to Fashion-MNIST
ships offline, so ``unleash detector train --kind diffusion --benchmark fmnist`` trains on
Fashion-MNIST itself, which is not the paper's setting: for it, train on another benchmark of
the same image shape and evaluate with ``--benchmark`` naming the ID one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from unleash_ood.data.base import ImageSet
from unleash_ood.device import to_device
from unleash_ood.errors import UserError
from unleash_ood.generative.base import DetectorScore, require_integers
from unleash_ood.generative.diffusion import Diffusion

COVARIANCES = ("full", "tied", "diag", "spherical")


def path_statistics(path: torch.Tensor) -> torch.Tensor:
    """The six statistics ``(N, 6)`` (float64) of noise paths ``(steps, N, C, H, W)``."""
    eps = path.double()
    d = eps.diff(dim=0) * eps.shape[0]
    dims = (0, 2, 3, 4)
    return torch.stack([v.pow(k).sum(dims) for v in (eps, d) for k in (1, 2, 3)], 1)


@dataclass
class DiffPath(DetectorScore):
    """Log-density of a Gaussian mixture over the DDIM path statistics, fitted on ID."""

    steps: int = 10
    components: int = 50
    covariance: str = "full"
    samples: int = 10000
    batch_size: int = 256
    name: ClassVar[str] = "diffpath"
    kinds: ClassVar[tuple[str, ...]] = ("diffusion",)
    requires_fit: ClassVar[bool] = True
    scaler_: Any = field(default=None, init=False, repr=False)
    mixture_: Any = field(default=None, init=False, repr=False)

    def check(self, model: Diffusion) -> None:
        if self.covariance not in COVARIANCES:
            raise UserError(
                f"unknown covariance {self.covariance!r}; choose {', '.join(COVARIANCES)}"
            )
        require_integers(
            self.name,
            1,
            components=self.components,
            samples=self.samples,
            batch_size=self.batch_size,
        )
        model.ddim_timesteps(self.steps)  # refuses a bad step count

    def statistics(self, model: Diffusion, x: torch.Tensor) -> np.ndarray:
        return path_statistics(model.ddim_inversion(x, self.steps)).cpu().numpy()

    def fit(
        self, model: Diffusion, train: ImageSet, device: torch.device, progress: bool = False
    ) -> DiffPath:
        n = min(self.samples, len(train))
        if n < self.components:
            raise UserError(
                f"diffpath fits {self.components} mixture components on {n} ID images; "
                "lower components or raise samples"
            )
        model.eval()
        data = train.subset(torch.arange(n))
        stats = np.concatenate(
            [
                self.statistics(model, to_device(x, device))
                for x, _ in tqdm(
                    data.batches(self.batch_size),
                    total=-(-n // self.batch_size),
                    desc="diffpath fit",
                    leave=False,
                    disable=not progress,
                )
            ]
        )
        self.scaler_ = StandardScaler().fit(stats)
        self.mixture_ = GaussianMixture(
            self.components, covariance_type=self.covariance, max_iter=200, random_state=0
        ).fit(self.scaler_.transform(stats))
        return self

    def score_batch(self, model: Diffusion, x: torch.Tensor) -> torch.Tensor:
        if self.mixture_ is None:
            raise UserError("diffpath is not fitted; call fit on ID training images first")
        density = self.mixture_.score_samples(self.scaler_.transform(self.statistics(model, x)))
        return torch.from_numpy(density).to(x.device)
