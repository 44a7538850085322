"""A small unconditional diffusion model (DDPM, Ho et al., 2020, with the cosine schedule of
Nichol & Dhariwal, 2021) and its deterministic DDIM inversion (Song et al., 2021), the model
DiffPath (:mod:`unleash_ood.generative.diffpath`) reads.

As the DiffPath code (clear-nus/diffpath ``configs/train_config.yaml``, built on
openai/improved-diffusion): 4000 diffusion steps on the cosine schedule, images in [-1, 1], the
noise-prediction loss ``|eps - eps_theta(x_t, t)|^2`` at a uniform ``t``, Adam lr 1e-4, batch
128, dropout 0.3; the inversion runs ``steps`` (10) evenly respaced DDIM steps from the image
towards noise, clipping the predicted clean image to [-1, 1].

Deviations: the UNet is CPU-sized (two resolutions, one residual block each, base width 32
with GroupNorm and a sinusoidal time embedding; theirs is improved-diffusion's UNet with
width 128, three residual blocks per resolution and attention); it predicts the noise only
(no learned variance, which DDIM does not use); training runs for epochs, not their 500k
iterations. Their exponential moving average of the weights (improved-diffusion's ``ema_rate``
0.9999; DiffPath's released checkpoint is that average) is the option ``ema`` (``--model-arg
ema=0.9999``), off by default: it starts from the initial weights, so after the few thousand
steps a CPU trains, 0.9999 leaves most of the average at them (0.9999^4300 = 0.65). With it,
the average is the model DDIM inversion and the validation loss use.
The validation loss (``forward``) is the noise-prediction error at 10 evenly
spaced timesteps with noise from a fixed seed, so it is deterministic.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.generative.base import GenerativeModel


def cosine_alphas_cumprod(steps: int) -> torch.Tensor:
    """``alpha_bar_t`` of the cosine schedule for ``t = 0 .. steps - 1`` (float64):
    ``prod(1 - beta)`` with ``beta_t = min(1 - f(t + 1) / f(t), 0.999)`` and
    ``f(t) = cos((t / steps + 0.008) / 1.008 * pi / 2)^2``."""
    t = torch.arange(steps + 1, dtype=torch.float64)
    f = torch.cos((t / steps + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding ``(N, dim)`` of timesteps ``t`` (improved-diffusion's)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], 1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; plus the time embedding; GroupNorm, SiLU, dropout, conv."""

    def __init__(self, c_in: int, c_out: int, emb: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(min(8, c_in), c_in), nn.GroupNorm(8, c_out)
        self.conv1, self.conv2 = nn.Conv2d(c_in, c_out, 3, 1, 1), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.emb, self.dropout = nn.Linear(emb, c_out), nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(self.dropout(F.silu(self.norm2(h))))


class UNet(nn.Module):
    """Two resolutions: in-conv, block, downsample, block, block, upsample, block (with the
    skip), out-conv; every block sees the time embedding."""

    def __init__(self, channels: int, width: int, dropout: float):
        super().__init__()
        emb = 4 * width
        self.width = width
        self.embed = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(channels, width, 3, 1, 1)
        self.down1 = ResBlock(width, width, emb, dropout)
        self.pool = nn.Conv2d(width, width, 3, 2, 1)
        self.mid1 = ResBlock(width, 2 * width, emb, dropout)
        self.mid2 = ResBlock(2 * width, 2 * width, emb, dropout)
        self.up1 = ResBlock(3 * width, width, emb, dropout)
        self.out = nn.Sequential(
            nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, channels, 3, 1, 1)
        )
        nn.init.zeros_(self.out[-1].weight)  # their zero-initialised output (use_zero_module)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.embed(time_embedding(t, self.width))
        h1 = self.down1(self.inp(x), emb)
        h = self.mid2(self.mid1(self.pool(h1), emb), emb)
        h = F.interpolate(h, size=h1.shape[-2:])
        return self.out(self.up1(torch.cat([h, h1], 1), emb))


class Diffusion(GenerativeModel):
    """An unconditional noise-prediction model on ``diffusion_steps`` cosine-schedule steps."""

    kind: ClassVar[str] = "diffusion"

    def __init__(
        self,
        in_channels: int = 1,
        input_size: int = 28,
        width: int = 32,
        dropout: float = 0.3,
        diffusion_steps: int = 4000,
        ema: float = 0.0,
    ):
        super().__init__(in_channels, input_size)
        if input_size % 2:
            raise UserError(f"the diffusion UNet takes images of even side; got {input_size}")
        if width < 8 or width % 8 or not 0 <= dropout < 1 or diffusion_steps < 2:
            raise UserError(
                "the diffusion model needs width a multiple of 8, dropout in [0, 1) and "
                "diffusion_steps >= 2"
            )
        if not (isinstance(ema, int | float) and 0 <= ema < 1):
            raise UserError(f"ema is a rate in [0, 1) (0: off; the authors' 0.9999); got {ema!r}")
        self.width, self.dropout, self.diffusion_steps = width, dropout, diffusion_steps
        self.ema = ema
        self.unet = UNet(in_channels, width, dropout)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False) if ema > 0 else None
        # float64, as improved-diffusion keeps it: 1 / alpha_bar - 1 is tiny at t = 0.
        self.register_buffer(
            "alphas_cumprod", cosine_alphas_cumprod(diffusion_steps), persistent=False
        )

    def options(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "dropout": self.dropout,
            "diffusion_steps": self.diffusion_steps,
            "ema": self.ema,
        }

    def denoiser(self) -> nn.Module:
        """The network that inverts and is validated: the moving average when kept."""
        return self.unet if self.ema_unet is None else self.ema_unet

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.unet.parameters())}]

    def clip_groups(self) -> list[list[nn.Parameter]]:
        return [list(self.unet.parameters())]

    def train_step(
        self, x: torch.Tensor, opt: torch.optim.Optimizer, grad_clip: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step of the noise-prediction loss, then the moving average's update
        ``avg = ema * avg + (1 - ema) * w`` (improved-diffusion's ``update_ema``)."""
        loss, parts = super().train_step(x, opt, grad_clip)
        if self.ema_unet is not None:
            with torch.no_grad():
                for avg, w in zip(self.ema_unet.parameters(), self.unet.parameters(), strict=True):
                    avg.mul_(self.ema).add_(w, alpha=1 - self.ema)
        return loss, parts

    def ddim_timesteps(self, steps: int) -> torch.Tensor:
        """The ``steps`` respaced timesteps ``0, k, 2k, ...`` with the smallest stride ``k``
        that gives exactly ``steps`` of them (improved-diffusion's ``ddimN`` respacing)."""
        stride = -(-self.diffusion_steps // steps) if isinstance(steps, int) and steps > 0 else 0
        if stride < 1 or len(range(0, self.diffusion_steps, stride)) != steps:
            raise UserError(
                f"{self.diffusion_steps} diffusion steps cannot be respaced into {steps!r} "
                "DDIM steps; choose a divisor of them"
            )
        return torch.arange(steps) * stride

    def noise_error(
        self, net: nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample squared noise-prediction error of ``net`` on images in [-1, 1] at
        timesteps ``t``."""
        ab = self.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        return (net(xt, t) - noise).pow(2).flatten(1).mean(1)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x0 = 2 * x - 1
        t = torch.randint(0, self.diffusion_steps, (x.shape[0],), device=x.device)
        return self.noise_error(self.unet, x0, t, torch.randn_like(x0)).mean(), {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean noise-prediction error at 10 evenly spaced timesteps, noise from seed 0."""
        g = torch.Generator(device=x.device).manual_seed(0)
        x0 = 2 * x - 1
        errors = [
            self.noise_error(
                self.denoiser(),
                x0,
                torch.full((x.shape[0],), int(t), device=x.device),
                torch.randn(x0.shape, generator=g, device=x.device),
            )
            for t in torch.arange(10) * self.diffusion_steps // 10
        ]
        return torch.stack(errors).mean(0)

    @torch.no_grad()
    def ddim_inversion(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        """The noise ``(steps, N, C, H, W)`` along the DDIM path from images ``x`` in [0, 1]
        towards noise: at step ``i`` (timestep ``t_i``, ``a = alpha_bar(t_i)``, ``a'`` the next
        step's, 0 after the last), ``x0 = clip((x_i - sqrt(1 - a) eps_theta(x_i, t_i)) /
        sqrt(a), -1, 1)``, the noise re-derived from it ``eps_i = (x_i / sqrt(a) - x0) /
        sqrt(1 / a - 1)`` (what the authors record), and ``x_{i+1} = sqrt(a') x0 +
        sqrt(1 - a') eps_i``."""
        ts = self.ddim_timesteps(steps)
        ab = self.alphas_cumprod[ts].tolist()
        xi, path = 2 * x - 1, []
        for i, (t, a) in enumerate(zip(ts.tolist(), ab, strict=True)):
            a_next = ab[i + 1] if i + 1 < steps else 0.0
            eps = self.denoiser()(xi, torch.full((x.shape[0],), t, device=x.device))
            x0 = ((xi - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
            eps = (xi / math.sqrt(a) - x0) / math.sqrt(1 / a - 1)
            path.append(eps)
            xi = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
        return torch.stack(path)
