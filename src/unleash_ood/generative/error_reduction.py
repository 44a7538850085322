"""Error Reduction (Zeng & Liu, 2023, "Unsupervised Out-of-Distribution Detection by Restoring
Lossy Inputs with Variational Autoencoder"; code ZJLAB-AMMI/VAE4OOD ``measure.py``).

A VAE trained to restore lossy inputs (:mod:`unleash_ood.generative.vae`) is asked to restore
``lossy(x)`` to ``x``. The error it removes is

    E = CE(lossy(x) as a prediction of x) - CE(VAE's restoration of x)

both summed over pixels, in nats: the lossy image predicts each 8-bit value by logits that are
1 at its own value and 0 elsewhere. ID images are restored well, so E is large for them. The
complexity correction adds ``lam * (L - L_d)`` when E >= 0, where L and L_d are the PNG
lengths in bits of the original and of the lossy image (compression level 9): an image whose
detail the lossy operation destroys has more to restore, which E alone would credit to the ID.

Deviations from the authors' code, all so that a score is a deterministic function of the image:
- The restoration decodes the posterior mean, not one latent draw.
- The lossy image's one-hot logits are built per pixel. The authors' ``xx[:, x_p[:]] = 1``
  sets, in every pixel's row, a 1 at every value that occurs anywhere in the lossy image, which
  the paper's definition does not describe.
- PNG lengths come from Pillow (zlib), not OpenCV (``cv2.imencode``, which also reads an RGB
  tensor as BGR). The two encoders' lengths differ per image, not by a constant: on 1,000
  Fashion-MNIST test images, L - L_d differed by -137 bits on average (std 71, up to 512)
  against a spread of L - L_d itself of about 716 bits. OpenCV is not a dependency here.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unleash_ood.errors import UserError
from unleash_ood.generative.base import DetectorScore
from unleash_ood.generative.vae import LEVELS, VAE, lossy_input, pixel_targets

# Cross-entropy of one pixel under logits 1 at one value and 0 at the other 255.
_LOG_NORMALISER = math.log(math.e + LEVELS - 1)


def png_bits(images: torch.Tensor) -> torch.Tensor:
    """PNG length in bits of each image of a uint8 ``(N, C, H, W)`` batch (level 9)."""
    out = []
    for img in images.cpu().numpy():
        array = img[0] if img.shape[0] == 1 else np.ascontiguousarray(img.transpose(1, 2, 0))
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG", compress_level=9)
        out.append(8 * buf.tell())
    return torch.tensor(out, dtype=torch.float64)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return pixel_targets(x).clamp(0, 255).to(torch.uint8)


def lossy_error(x: torch.Tensor, lossy: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy (nats, summed over pixels) of ``x`` under logits that are 1 at
    each pixel's value in ``lossy`` and 0 elsewhere: ``log(e + 255)`` per pixel, minus 1 where
    the lossy image kept the value."""
    same = (pixel_targets(x) == pixel_targets(lossy)).flatten(1).sum(1)
    return x[0].numel() * _LOG_NORMALISER - same.double()


@dataclass
class ErrorReduction(DetectorScore):
    """``E + lam * (L - L_d)`` when ``E >= 0``, else ``E``; higher = more ID-like.
    ``lam`` is the authors' ``--lam`` (default 1)."""

    lam: float = 1.0
    name: ClassVar[str] = "error_reduction"
    kinds: ClassVar[tuple[str, ...]] = ("vae",)

    def check(self, model: VAE) -> None:
        if isinstance(self.lam, bool) or not isinstance(self.lam, int | float):
            raise UserError(f"error_reduction's lam is a number; got {self.lam!r}")
        if model.lossy == "none":
            raise UserError(
                "error_reduction needs a VAE trained to restore lossy inputs; train one with "
                "the default --model-arg lossy=downsample"
            )

    @torch.no_grad()
    def score_batch(self, model: VAE, x: torch.Tensor) -> torch.Tensor:
        lossy = lossy_input(x, model.lossy)
        mu, _ = model.encode(lossy)
        restored = F.cross_entropy(model.decode(mu), pixel_targets(x), reduction="none")
        e = lossy_error(x, lossy) - restored.flatten(1).sum(1).double()
        complexity = (png_bits(to_uint8(x)) - png_bits(to_uint8(lossy))).to(e.device)
        return torch.where(e >= 0, e + self.lam * complexity, e)
