"""A small Vision Transformer sized for 28x28 / 32x32 images on a CPU.

The classifier MOOD fine-tunes (Li, Chen, Yu, He, Liu, Jia, "Rethinking Out-of-distribution
(OOD) Detection: Masked Image Modeling is All You Need", CVPR 2023; dvlab-research/MOOD) is
BEiT's ViT: pre-norm transformer blocks over non-overlapping patches, features the LayerNorm'd
mean of the patch tokens (BEiT's ``use_mean_pooling``, the default of MOOD's fine-tuning and
feature extraction), a linear head. Here, by default, 4x4 patches (49 tokens for 28x28, 64 for
32x32), width 128, 6 blocks of 4 heads, MLP ratio 4: 1.2M parameters.

Deviations from BEiT-base: learned absolute position embeddings (MAE's choice) instead of
relative position biases, no CLS token (mean pooling never reads it), no layer scale and no
stochastic depth; the final LayerNorm is applied to every token before pooling (BEiT applies
``fc_norm`` after pooling), so that masked-image pretraining and classification read the same
normalised tokens. The patch tokens are exposed as a feature map ``(N, D, H/p, W/p)``, so the
feature-map scorers work on this model too and the pooled features are its spatial mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unleash_ood.errors import UserError
from unleash_ood.models.base import Classifier


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """Patch embedding, position embeddings, blocks and the final norm: the part of the ViT
    that masked-image pretraining trains and fine-tuning inherits."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        patch_size: int = 4,
        dim: int = 128,
        depth: int = 6,
        heads: int = 4,
    ):
        super().__init__()
        if image_size % patch_size:
            raise UserError(
                f"patch_size {patch_size} does not divide the image side {image_size}; "
                "choose a divisor (4 for 28x28 and 32x32 images)"
            )
        if dim % heads:
            raise UserError(f"dim {dim} does not split into {heads} heads; use a multiple")
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def tokens(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalised output tokens ``(N, L, D)`` of normalised images; where the boolean
        ``mask`` ``(N, L)`` is set, the patch's embedding is replaced by ``mask_token``
        (BEiT's masked input) before the position embeddings are added."""
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        if mask is not None:
            t = torch.where(mask.unsqueeze(-1), mask_token.to(t.dtype), t)
        t = t + self.pos_embed
        for block in self.blocks:
            t = block(t)
        return self.norm(t)


class ViT(Classifier):
    """A small ViT classifier; ``image_size`` fixes the number of position embeddings."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int = 28,
        patch_size: int = 4,
        dim: int = 128,
        depth: int = 6,
        heads: int = 4,
    ):
        super().__init__(mean, std)
        self.encoder = ViTEncoder(in_channels, image_size, patch_size, dim, depth, heads)
        self.head = nn.Linear(dim, num_classes)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        t = self.encoder.tokens(x)
        g = self.encoder.grid
        return t.transpose(1, 2).reshape(len(t), -1, g, g)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.tokens(x).mean(1)
