"""The VAE shared by Error Reduction and the likelihood score test, and its ELBO.

Architecture as in the Error Reduction code (ZJLAB-AMMI/VAE4OOD ``model.py``, itself the
DCGAN-style VAE of Likelihood Regret, Xiao et al. 2020): five 5x5/7x7 convolutions with
LeakyReLU down to a ``2 * latent``-channel map, two linear layers for the posterior mean and
log-variance, six transposed convolutions and a 5x5 output convolution giving 256 logits per
pixel and channel (a categorical likelihood over the 8-bit values). Convolution weights start
from N(0, 0.02), as there.

Zeng & Liu (2023, "Unsupervised Out-of-Distribution Detection by Restoring Lossy Inputs with
Variational Autoencoder") train it to restore a lossy input to the original: the encoder sees
``lossy(x)``, the decoder's categorical likelihood is scored against ``x``. Their default lossy
operation, used here, is nearest-neighbour downsampling to a quarter of the side and back.
Their random patch masking is not offered: it would make a score depend on the mask drawn.

With ``lossy="none"`` the model is a plain VAE of the same architecture, which the likelihood
scores (``elbo``, ``score_test``) need: on a restoring VAE the "ELBO" would be the likelihood
of ``x`` given ``lossy(x)``, not of ``x``. Choi et al. (2021) test Likelihood Regret's DCGAN
VAE instead (batch norm, ReLU, 4x4 stride-2 convolutions, Fashion-MNIST resized to 32x32,
trained with horizontal flips at Adam lr 1e-3 halved every 30 epochs for 100 epochs), which is
not offered here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.generative.base import DetectorScore, GenerativeModel

LOSSY = ("downsample", "none")
LEVELS = 256  # categorical likelihood over 8-bit pixel values


def lossy_input(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``downsample``: nearest-neighbour to 1/4 of the side and back (``F.interpolate``'s
    default mode, as the authors' code); ``none``: ``x`` itself."""
    if kind == "none":
        return x
    size = x.shape[-1]
    return F.interpolate(F.interpolate(x, size=size // 4), size=size)


def pixel_targets(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit values of images in [0, 1], as class indices."""
    return (x * 255).round().long()


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample, in nats."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)


class VAE(GenerativeModel):
    """The Error Reduction / Likelihood Regret VAE for square images of side 28 or 32 (or any
    multiple of 4 from 28 up)."""

    kind: ClassVar[str] = "vae"

    def __init__(
        self,
        in_channels: int = 1,
        input_size: int = 28,
        width: int = 32,
        latent: int = 100,
        lossy: str = "downsample",
        beta: float = 1.0,
    ):
        super().__init__(in_channels, input_size)
        if lossy not in LOSSY:
            raise UserError(f"unknown lossy operation {lossy!r}; choose {', '.join(LOSSY)}")
        if input_size % 4 or input_size < 28:
            raise UserError(f"the VAE takes square images of side 28, 32, ...; got {input_size}")
        self.width, self.latent, self.lossy, self.beta = width, latent, lossy, beta
        b, act = width, nn.LeakyReLU
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, b, 5, 1, 2),
            act(),
            nn.Conv2d(b, b, 5, 2, 2),
            act(),
            nn.Conv2d(b, 2 * b, 5, 1, 2),
            act(),
            nn.Conv2d(2 * b, 2 * b, 5, 2, 2),
            act(),
            nn.Conv2d(2 * b, 2 * latent, 7, 1, 0),
            act(),
            nn.Flatten(),
        )
        side = input_size // 4 - 6
        self.to_mu = nn.Linear(2 * latent * side * side, latent)
        self.to_logvar = nn.Linear(2 * latent * side * side, latent)
        self.decoder = nn.Sequential(
            nn.Unflatten(1, (latent, 1, 1)),
            nn.ConvTranspose2d(latent, 2 * b, input_size // 4, 1, 0),
            act(),
            nn.ConvTranspose2d(2 * b, 2 * b, 5, 1, 2),
            act(),
            nn.ConvTranspose2d(2 * b, 2 * b, 5, 2, 2, output_padding=1),
            act(),
            nn.ConvTranspose2d(2 * b, b, 5, 1, 2),
            act(),
            nn.ConvTranspose2d(b, b, 5, 2, 2, output_padding=1),
            act(),
            nn.ConvTranspose2d(b, b, 5, 1, 2),
            act(),
        )
        self.out = nn.Conv2d(b, LEVELS * in_channels, 5, 1, 2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def options(self) -> dict[str, Any]:
        return {"width": self.width, "latent": self.latent, "lossy": self.lossy, "beta": self.beta}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance of images ``x`` in [0, 1] (already made lossy)."""
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 256, C, H, W)`` of the categorical likelihood of each pixel value."""
        logits = self.out(self.decoder(z))
        n, _, h, w = logits.shape
        return logits.view(n, self.in_channels, LEVELS, h, w).transpose(1, 2)

    def negative_elbo(self, x: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample reconstruction cross-entropy (summed over pixels) and KL term, in nats,
        of images ``x`` in [0, 1]. The encoder sees ``lossy(x)``; the decoder is scored against
        ``x``. ``sample``: decode a reparameterised latent draw (training) or the posterior
        mean (scoring, as the score test's code does with one sample)."""
        mu, logvar = self.encode(lossy_input(x, self.lossy))
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu) if sample else mu
        rec = F.cross_entropy(self.decode(z), pixel_targets(x), reduction="none")
        return rec.flatten(1).sum(1), kl_standard_normal(mu, logvar)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic negative ELBO per sample (decoder at the posterior mean)."""
        rec, kl = self.negative_elbo(x, sample=False)
        return rec + self.beta * kl

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The authors' training loss: summed cross-entropy + beta * KL, averaged over the
        batch."""
        rec, kl = self.negative_elbo(x, sample=True)
        rec, kl = rec.mean(), kl.mean()
        return rec + self.beta * kl, {"rec": rec.detach(), "kl": kl.detach()}

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Encoder and decoder apart: the authors clip each optimiser's gradients."""
        enc = [*self.encoder.parameters(), *self.to_mu.parameters(), *self.to_logvar.parameters()]
        return [enc, [*self.decoder.parameters(), *self.out.parameters()]]


def require_plain(model: VAE, score: str) -> None:
    """Refuse a likelihood score on a VAE trained to restore lossy inputs."""
    if model.lossy != "none":
        raise UserError(
            f"{score} needs a plain VAE (this one restores lossy={model.lossy} inputs, so its "
            f"ELBO is not the likelihood of the image); train one with --model-arg lossy=none"
        )


@dataclass
class ELBO(DetectorScore):
    """The plain likelihood score: minus the negative ELBO (decoder at the posterior mean),
    in nats. The baseline whose failure the other scores address: likelihoods of generative
    models can rate simple OOD images (MNIST digits against Fashion-MNIST, SVHN against
    CIFAR-10) as more likely than ID images (Nalisnick et al., 2019)."""

    name: ClassVar[str] = "elbo"
    kinds: ClassVar[tuple[str, ...]] = ("vae",)

    def check(self, model: VAE) -> None:
        require_plain(model, self.name)

    @torch.no_grad()
    def score_batch(self, model: VAE, x: torch.Tensor) -> torch.Tensor:
        return -model(x)
