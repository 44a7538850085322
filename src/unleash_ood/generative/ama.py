"""AMA (Somepalli, Wu, Balaji, Zhang, Feizi, Shrivastava, 2020, "Unsupervised Anomaly
Detection with Adversarial Mirrored AutoEncoders", UAI 2021; code somepago/AMA ``train.py``,
``loss.py``, ``anom_utils.py``, ``cifar_models_bNorm.py``).

An encoder E and a generator G form an autoencoder; a Wasserstein critic D sees *mirrored
pairs*, an image stacked channel-wise with itself, ``(x, x)``, or with its reconstruction,
``(x, G(E(x)))``. Per batch, as the authors' code with its command-line defaults (every
training image normal, no gradient penalty, plain convolutions):

- the critic takes ``critic_steps`` (5) steps on ``-D(x, x) + D(x, G(E(x)))`` (batch means,
  the reconstruction held fixed);
- the autoencoder takes one step on ``-D(x, G(E(x))) + reg * |E(x)|_2`` (``reg`` = 1).

The anomaly score is the L1 distance between the critic's features ``f`` (its last ReLU map
summed over space) of the two pairs, ``|f(x, x) - f(x, G(E(x)))|_1``; the library's score
``ama`` is minus it (higher = more ID-like).

Networks as the authors': a DCGAN encoder (4x4 stride-2 convolutions, batch norm,
LeakyReLU 0.2, a 4x4 convolution to the latent), an SNGAN ResNet generator (linear to 4x4,
three upsampling residual blocks with batch norm, tanh) and ResNet critic (a downsampling
first block, a downsampling and two plain pre-activation blocks), with their Xavier
initialisations; images are scaled to [-1, 1]. Adam lr 3e-4 with betas (0, 0.9) for critic
and generator and (0.5, 0.9) for the encoder, batch 256, 100 epochs.

The README's OOD command adds to those defaults a gradient penalty of weight 10 and spectral
norm on every critic layer: both are options here (``--model-arg gradient_penalty=10
--model-arg spectral_norm=true``), off by default as in their defaults.

- ``gradient_penalty`` is their own form (``loss.py``, ``calc_gradient_penalty``): the pair
  ``(x, x~)`` with ``x~`` a per-image random point between ``x`` and its reconstruction, the
  critic's gradient with respect to the whole pair, its norm per pixel over the pair's
  channels, ``weight * mean (norm - 1)^2`` added to the critic's loss.
- ``spectral_norm`` divides every critic convolution and linear weight by its largest singular
  value, estimated by one power iteration per training forward pass, as their
  ``layers/spectral_norm.py``; here by :func:`torch.nn.utils.parametrizations.spectral_norm`.

Deviations:
- The README's OOD command also passes ``--anom_pc 0.1 --anom_recon_lambda 5``: labelled
  anomalies (SVHN training images) pushed away in training, which makes it semi-supervised;
  that is not offered.
- With the gradient penalty, the critic step's reconstruction is reused for the interpolation;
  theirs computes it a second time, which moves the batch-norm running statistics once more.
- Spectral norm's power iteration runs in training mode only (PyTorch's rule); theirs also
  iterates, without storing the result, in evaluation mode.
- Widths are CPU-sized by default: encoder base 16 (theirs 32), generator 64 (256), critic
  64 (128), latent 64 (128); pass the authors' with ``--model-arg``.
- Images smaller than 32 (Fashion-MNIST's 28) are padded with black to 32, the side their
  networks take.
- The learning rate follows the library's ``step`` schedule (/10 at 50 % and 75 % of the
  epochs), not theirs (/10 at epochs 30, 60 and 90).
- Their code picks the best epoch by the AUROC of a Gaussian density fitted to training
  scores on a validation set *with labelled anomalies*. Here training keeps
  ``checkpoints/best``, the epoch whose ``ama`` score separates the ID validation split best
  from the benchmark's OOD validation sets (mean AUROC; every saved epoch a candidate, not
  only from epoch 20 on); test sets are never read. Without OOD validation sets no epoch is
  selected and ``checkpoints/last`` is the model. The Gaussian density score is not offered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from unleash_ood.errors import UserError
from unleash_ood.generative.base import DetectorScore, GenerativeModel, clip_gradients

SIDE = 32  # the side the authors' networks take


def mirrored_pairs(x: torch.Tensor, rec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The critic's two inputs, stacked along channels: ``(x, x)`` and ``(x, rec)``."""
    return torch.cat([x, x], 1), torch.cat([x, rec], 1)


def feature_distance(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Per-sample L1 distance of two ``(N, D)`` feature batches."""
    return (real - fake).abs().sum(1)


def gradient_penalty(
    critic: nn.Module, x: torch.Tensor, rec: torch.Tensor, weight: float
) -> torch.Tensor:
    """AMA's gradient penalty: ``weight * mean (|grad D(x, x~)| - 1)^2``, with ``x~`` a random
    point per image between ``x`` and ``rec`` and the norm taken per pixel over the pair's
    channels (their ``calc_gradient_penalty``)."""
    alpha = torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)
    pair = torch.cat([x, alpha * x + (1 - alpha) * rec], 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(pair).sum(), pair, create_graph=True)
    return weight * ((grad.norm(2, dim=1) - 1) ** 2).mean()


def _xavier(module: nn.Conv2d | nn.Linear, gain: float) -> nn.Module:
    nn.init.xavier_uniform_(module.weight, gain)
    return module


class GeneratorBlock(nn.Module):
    """SNGAN generator block: BN, ReLU, 2x nearest upsampling, 3x3 conv, BN, ReLU, 3x3 conv,
    plus a 1x1-convolved upsampled shortcut."""

    def __init__(self, ch: int):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(ch), nn.BatchNorm2d(ch)
        self.conv1 = _xavier(nn.Conv2d(ch, ch, 3, 1, 1), math.sqrt(2))
        self.conv2 = _xavier(nn.Conv2d(ch, ch, 3, 1, 1), math.sqrt(2))
        self.shortcut = _xavier(nn.Conv2d(ch, ch, 1), 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2)
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return h + self.shortcut(F.interpolate(x, scale_factor=2))


class CriticBlock(nn.Module):
    """SNGAN critic block: (ReLU unless ``first``), 3x3 conv, ReLU, 3x3 conv, (2x2 average
    pooling when ``downsample``), plus a shortcut that is 1x1-convolved when the block is the
    first or downsamples, and pooled when it downsamples."""

    def __init__(self, c_in: int, c_out: int, first: bool = False, downsample: bool = False):
        super().__init__()
        self.first, self.downsample = first, downsample
        self.conv1 = _xavier(nn.Conv2d(c_in, c_out, 3, 1, 1), math.sqrt(2))
        self.conv2 = _xavier(nn.Conv2d(c_out, c_out, 3, 1, 1), math.sqrt(2))
        self.shortcut = _xavier(nn.Conv2d(c_in, c_out, 1), 1.0) if first or downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        s = x if self.shortcut is None else self.shortcut(x)
        if self.downsample:
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class Critic(nn.Module):
    """The Wasserstein critic on mirrored pairs (``2 * channels`` inputs)."""

    def __init__(self, in_channels: int, ch: int, spectral_norm: bool = False):
        super().__init__()
        self.blocks = nn.Sequential(
            CriticBlock(2 * in_channels, ch, first=True, downsample=True),
            CriticBlock(ch, ch, downsample=True),
            CriticBlock(ch, ch),
            CriticBlock(ch, ch),
        )
        self.head = _xavier(nn.Linear(ch, 1, bias=False), 1.0)
        if spectral_norm:
            for layer in [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]:
                parametrizations.spectral_norm(layer)

    def features(self, pair: torch.Tensor) -> torch.Tensor:
        """``(N, ch)``: the last ReLU map summed over space."""
        return F.relu(self.blocks(pair)).sum((2, 3))

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pair)).squeeze(1)


def _encoder(in_channels: int, ndf: int, latent: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in ((in_channels, 2 * ndf), (2 * ndf, 4 * ndf), (4 * ndf, 8 * ndf)):
        layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out)]
        layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers, nn.Conv2d(8 * ndf, latent, 4, 1, 0, bias=False), nn.Flatten())


def _generator(out_channels: int, ch: int, latent: int) -> nn.Sequential:
    return nn.Sequential(
        _xavier(nn.Linear(latent, 4 * 4 * ch), 1.0),
        nn.Unflatten(1, (ch, 4, 4)),
        *(GeneratorBlock(ch) for _ in range(3)),
        nn.BatchNorm2d(ch),
        nn.ReLU(),
        _xavier(nn.Conv2d(ch, out_channels, 3, 1, 1), 1.0),
        nn.Tanh(),
    )


class AMA(GenerativeModel):
    """Encoder, generator and mirrored-pair critic for square images of side up to 32."""

    kind: ClassVar[str] = "ama"
    selects_epoch: ClassVar[bool] = True

    def __init__(
        self,
        in_channels: int = 1,
        input_size: int = 28,
        width: int = 16,
        gen_width: int = 64,
        critic_width: int = 64,
        latent: int = 64,
        critic_steps: int = 5,
        reg: float = 1.0,
        gradient_penalty: float = 0.0,
        spectral_norm: bool = False,
    ):
        super().__init__(in_channels, input_size)
        if input_size > SIDE or (SIDE - input_size) % 2:
            raise UserError(f"AMA takes square images of side 32 or 28, 30, ...; got {input_size}")
        if min(width, gen_width, critic_width, latent, critic_steps) < 1:
            raise UserError("AMA's widths, latent and critic_steps must be >= 1")
        if min(reg, gradient_penalty) < 0:
            raise UserError("AMA's reg and gradient_penalty must be >= 0")
        if not isinstance(spectral_norm, bool):
            raise UserError(f"AMA's spectral_norm is true or false, got {spectral_norm!r}")
        self.width, self.gen_width, self.critic_width = width, gen_width, critic_width
        self.latent, self.critic_steps, self.reg = latent, critic_steps, reg
        self.gradient_penalty, self.spectral_norm = gradient_penalty, spectral_norm
        self.encoder = _encoder(in_channels, width, latent)
        self.generator = _generator(in_channels, gen_width, latent)
        self.critic = Critic(in_channels, critic_width, spectral_norm)

    def options(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "gen_width": self.gen_width,
            "critic_width": self.critic_width,
            "latent": self.latent,
            "critic_steps": self.critic_steps,
            "reg": self.reg,
            "gradient_penalty": self.gradient_penalty,
            "spectral_norm": self.spectral_norm,
        }

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] as the networks take them: in [-1, 1], padded with black to 32."""
        pad = (SIDE - x.shape[-1]) // 2
        return F.pad(x * 2 - 1, (pad, pad, pad, pad), value=-1.0)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``G(E(x))`` of prepared images."""
        return self.generator(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The authors' anomaly score per image: L1 distance of the critic's features of
        ``(x, x)`` and ``(x, G(E(x)))``."""
        x = self.prepare(x)
        real, fake = mirrored_pairs(x, self.reconstruct(x))
        return feature_distance(self.critic.features(real), self.critic.features(fake))

    def critic_loss(self, x: torch.Tensor) -> torch.Tensor:
        """``-mean D(x, x) + mean D(x, G(E(x)))`` of prepared images, reconstruction fixed,
        plus the gradient penalty when its weight is positive."""
        with torch.no_grad():
            rec = self.reconstruct(x)
        real, fake = mirrored_pairs(x, rec)
        loss = self.critic(fake).mean() - self.critic(real).mean()
        if self.gradient_penalty > 0:
            loss = loss + gradient_penalty(self.critic, x, rec, self.gradient_penalty)
        return loss

    def autoencoder_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``-mean D(x, G(E(x)))`` and the latent norm penalty ``mean |E(x)|_2``."""
        z = self.encoder(x)
        _, fake = mirrored_pairs(x, self.generator(z))
        return -self.critic(fake).mean(), z.norm(dim=1).mean()

    def param_groups(self) -> list[dict[str, Any]]:
        """The authors' three optimisers: the encoder's Adam has beta1 0.5, the others the
        recipe's betas (0, 0.9 by default)."""
        return [
            {"params": list(self.critic.parameters())},
            {"params": list(self.generator.parameters())},
            {"params": list(self.encoder.parameters()), "betas": (0.5, 0.9)},
        ]

    def clip_groups(self) -> list[list[nn.Parameter]]:
        return [[*self.encoder.parameters(), *self.generator.parameters()]]

    def train_step(
        self, x: torch.Tensor, opt: torch.optim.Optimizer, grad_clip: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``critic_steps`` critic steps, then one autoencoder step, on the same batch; the
        autoencoder step leaves the critic's gradients empty, so Adam leaves it alone."""
        x = self.prepare(x)
        for _ in range(self.critic_steps):
            opt.zero_grad(set_to_none=True)
            critic = self.critic_loss(x)
            critic.backward()
            clip_gradients([list(self.critic.parameters())], grad_clip)
            opt.step()
        opt.zero_grad(set_to_none=True)
        adversarial, norm = self.autoencoder_loss(x)
        loss = adversarial + self.reg * norm
        loss.backward()
        for p in self.critic.parameters():
            p.grad = None
        clip_gradients(self.clip_groups(), grad_clip)
        opt.step()
        return loss.detach(), {"critic": critic.detach(), "latent_norm": norm.detach()}


@dataclass
class AMAScore(DetectorScore):
    """Minus the critic-feature distance of the mirrored pairs (:meth:`AMA.forward`)."""

    name: ClassVar[str] = "ama"
    kinds: ClassVar[tuple[str, ...]] = ("ama",)

    @torch.no_grad()
    def score_batch(self, model: AMA, x: torch.Tensor) -> torch.Tensor:
        return -model(x)
