"""The likelihood score test (Choi, Yoon, Bae, Kang, 2021, "Robust Out-of-Distribution
Detection on Deep Probabilistic Generative Models"; code shinypond/ood_detection,
``fisher_utils_VAE.py``).

For an input x, the score statistic is ``g^T F^-1 g`` with g the gradient of the VAE's
negative ELBO of x with respect to selected parameters, and F the Fisher information those
gradients have on ID training data. An ID input sits near a stationary point of the training
objective, so its statistic is small; the score is minus the statistic.

As in the authors' code of May 2021 (commit 38b0034, its Sherman-Morrison version):
- the VAE is a plain one (``lossy=none``; a restoring VAE is refused);
- the negative ELBO decodes the posterior mean (their one-sample setting);
- F is block-diagonal: each output unit's weight row is cut into ``splits`` equal blocks, and
  each block's Fisher is ``(1e-3 I + sum_i g_i g_i^T) / n`` over ``n`` ID training images
  (their Sherman-Morrison recursion from ``1000 I``, times ``n``, gives exactly its inverse;
  here it is a Cholesky factorisation in float64 and triangular solves);
- each layer's statistic, summed over its blocks, is divided by
  ``2 sqrt(blocks * d * d)`` (``d`` the block size).

Deviations: the layers' normalised statistics are summed into one score (that code reports
them per layer); the default layer is the decoder's output convolution (their run used the
encoder's first convolution, ``encoder.0.weight`` here) and the Fisher comes from the first
1,000 training images (their run drew 10,000 at random, flipped for CIFAR); per-sample gradients
come from ``torch.func`` in batches instead of one image per backward pass (the same values).
Their released code replaced this version: an EKFAC approximation of the Fisher over all the
encoder's convolutions (biases included), each layer's statistic standardised by its mean and
standard deviation over the Fisher images, and the maximum over layers (``ekfac(max)``): that is
``score_test_ekfac`` (:mod:`unleash_ood.generative.score_test_ekfac`). Their VAE is Likelihood
Regret's DCGAN VAE, not this architecture (see :mod:`unleash_ood.generative.vae`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from unleash_ood.data.base import ImageSet
from unleash_ood.device import to_device
from unleash_ood.errors import UserError
from unleash_ood.generative.base import DetectorScore, require_integers
from unleash_ood.generative.vae import VAE, require_plain

DAMPING = 1e-3  # the authors' 1000 I starting inverse


def per_sample_gradients(model: VAE, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Gradient of each image's deterministic negative ELBO with respect to the parameters
    ``names``: ``{name: (N, *shape)}``."""
    params = dict(model.named_parameters())
    fixed = {k: v.detach() for k, v in params.items() if k not in names}
    chosen = {k: params[k].detach() for k in names}

    def loss(chosen: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**fixed, **chosen}, (xi[None],))[0]

    return vmap(grad(loss), in_dims=(None, 0))(chosen, x)


def blocks(g: torch.Tensor, splits: int) -> torch.Tensor:
    """Per-sample gradients ``(N, out, ...)`` as ``(N, out * splits, d)`` blocks: each output
    unit's row cut into ``splits`` equal parts (the authors' reshape)."""
    rows = g.reshape(g.shape[0], g.shape[1], -1)
    return rows.reshape(g.shape[0], g.shape[1] * splits, -1)


def fisher_cholesky(gram: torch.Tensor, n: int, damping: float = DAMPING) -> torch.Tensor:
    """Cholesky factors ``L`` (``F = L L^T``) of each block's Fisher ``(damping I + gram) / n``,
    ``gram`` the summed ``g g^T`` of ``n`` ID gradients: ``(blocks, d, d)`` in float64."""
    eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=gram.device)
    return torch.linalg.cholesky((gram.double() + damping * eye) / n)


def statistic(g: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """``sum over blocks of g^T F^-1 g`` (as ``|L^-1 g|^2``), normalised by
    ``2 sqrt(blocks * d * d)``, for blocked gradients ``g`` ``(N, blocks, d)``."""
    rhs = g.double().permute(1, 2, 0)  # (blocks, d, N)
    solved = torch.linalg.solve_triangular(chol, rhs, upper=False)
    return solved.pow(2).sum((0, 1)) / (2 * chol.numel() ** 0.5)


@dataclass
class ScoreTest(DetectorScore):
    """Minus the Fisher-weighted gradient statistic; ``layers`` are parameter names joined by
    ``+`` (e.g. ``out.weight+decoder.1.weight``), ``samples`` the ID training images the
    Fisher is estimated from (the default of the authors' function; their run took 10,000),
    ``splits`` the blocks per row of the weight's first dimension."""

    layers: str = "out.weight"
    samples: int = 1000
    splits: int = 4
    batch_size: int = 50
    name: ClassVar[str] = "score_test"
    kinds: ClassVar[tuple[str, ...]] = ("vae",)
    requires_fit: ClassVar[bool] = True
    chol_: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def names(self) -> list[str]:
        return [n.strip() for n in self.layers.split("+") if n.strip()]

    def check(self, model: VAE) -> None:
        require_plain(model, self.name)
        require_integers(self.name, 2, samples=self.samples)
        require_integers(self.name, 1, splits=self.splits, batch_size=self.batch_size)
        if not isinstance(self.layers, str):
            raise UserError(
                f"score_test: layers are parameter names joined by +; got {self.layers!r}"
            )
        params = dict(model.named_parameters())
        for name in self.names():
            if name not in params:
                weights = ", ".join(n for n in params if n.endswith("weight"))
                raise UserError(f"score_test: the VAE has no parameter {name!r}; choose {weights}")
            p = params[name]
            if p.ndim < 2 or (p[0].numel() % self.splits):
                raise UserError(
                    f"score_test: {name} rows of {p[0].numel()} values do not split into "
                    f"{self.splits} blocks; choose a weight and splits that divides its rows"
                )

    def _blocked(self, model: VAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
        grads = per_sample_gradients(model, x, self.names())
        return {k: blocks(g, self.splits) for k, g in grads.items()}

    def fit(
        self, model: VAE, train: ImageSet, device: torch.device, progress: bool = False
    ) -> ScoreTest:
        """Estimate the Fisher blocks from the first ``samples`` ID training images."""
        self.check(model)
        data = train.subset(torch.arange(min(self.samples, len(train))))
        grams: dict[str, torch.Tensor] = {}
        total = -(-len(data) // self.batch_size)
        for x, _ in tqdm(
            data.batches(self.batch_size),
            total=total,
            desc="score_test Fisher",
            leave=False,
            disable=not progress,
        ):
            for k, g in self._blocked(model, to_device(x, device)).items():
                gram = torch.einsum("nbi,nbj->bij", g.double(), g.double())
                grams[k] = grams[k] + gram if k in grams else gram
        self.chol_ = {k: fisher_cholesky(gram, len(data)) for k, gram in grams.items()}
        return self

    def score_batch(self, model: VAE, x: torch.Tensor) -> torch.Tensor:
        if self.chol_ is None:
            raise UserError("score_test must be fit on ID training images before scoring")
        stats = [statistic(g, self.chol_[k]) for k, g in self._blocked(model, x).items()]
        return -torch.stack(stats).sum(0)
