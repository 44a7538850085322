"""Bounded per-sample summaries of a classifier's last feature map, by name.

Feature-map scorers need more than the pooled features, but keeping whole maps of every
training image is out of the question (a 512 x 4 x 4 map is 16 times the features, a 7 x 7
one 49 times). Each summary here turns a batch of maps ``(N, D, H, W)`` into a fixed, small
per-sample tensor, and :func:`unleash_ood.outputs.forward_outputs` keeps only that, computed
in the same forward pass as the features, when a scorer asks for it by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from unleash_ood.errors import UserError


def centre_window(size: int) -> slice:
    """The middle half of ``size`` positions, symmetric: ``[size // 4, size - size // 4)``
    (rows 1-2 of a 4 x 4 map, as in MODE's code; rows 1-5 of a 7 x 7 map)."""
    return slice(size // 4, size - size // 4)


def region_vectors(fmap: torch.Tensor) -> torch.Tensor:
    """MODE's multi-scale vectors ``(N, 6, D)`` of maps ``(N, D, H, W)``: the average over
    each quadrant (adaptive 2 x 2 pooling, row-major), over the whole map, and over the
    central window (Zhang et al., "From Global to Local: Multi-scale Out-of-distribution
    Detection", IEEE TIP 2023; the order of their ``feature_collect.py``)."""
    n, d, h, w = fmap.shape
    if h < 2 or w < 2:
        raise UserError(
            f"the model's last feature map is {h} x {w}; MODE's local vectors need at least 2 x 2"
        )
    quadrants = F.adaptive_avg_pool2d(fmap, 2).reshape(n, d, 4)
    whole = fmap.mean(dim=(2, 3))[:, :, None]
    centre = fmap[:, :, centre_window(h), centre_window(w)].mean(dim=(2, 3))[:, :, None]
    return torch.cat([quadrants, whole, centre], dim=2).transpose(1, 2)


def rank_one_removed(fmap: torch.Tensor) -> torch.Tensor:
    """RankFeat's features ``(N, D)``: the global average of each map ``(N, D, H, W)`` after
    its largest singular component (the map as a ``D x HW`` matrix) is subtracted (Song,
    Sebe and Wang, "RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection",
    NeurIPS 2022). An exact SVD, in float64, as their default (not the power iteration)."""
    n, d, h, w = fmap.shape
    x = fmap.reshape(n, d, h * w).double()
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    rank_one = s[:, :1, None] * (u[:, :, :1] @ vh[:, :1, :])
    return (x - rank_one).mean(dim=2).to(fmap.dtype)


def stage_means(stages: Sequence[torch.Tensor]) -> torch.Tensor:
    """The channel means of each stage's map, ``(N, L, C)`` for ``L`` stages, zero-padded to
    the widest stage ``C`` (the input of multi-layer Mahalanobis)."""
    width = max(s.shape[1] for s in stages)
    means = [F.pad(s.mean(dim=(2, 3)), (0, width - s.shape[1])) for s in stages]
    return torch.stack(means, dim=1)


GRAM_POWERS = tuple(range(1, 11))


def gram_rows(stages: Sequence[torch.Tensor]) -> torch.Tensor:
    """The row sums of each stage's p-th order Gram matrices, ``(N, L, P, C)`` for ``L``
    stages and the ``P`` powers of :data:`GRAM_POWERS`, zero-padded to the widest stage ``C``
    (Sastry and Oore, "Detecting Out-of-Distribution Examples with Gram Matrices", ICML 2020):
    with ``F`` a map as a ``C x HW`` matrix, ``G_p = (F^p) (F^p)^T`` (elementwise power) and
    the summary is ``sign(r) |r|^(1/p)`` of ``r = G_p 1``, computed as ``F^p (F^p)^T 1`` in
    ``O(C HW)``, in float64 (their code forms the whole ``C x C`` matrix)."""
    width = max(s.shape[1] for s in stages)
    per_stage = []
    for fmap in stages:
        x = fmap.reshape(*fmap.shape[:2], -1).double()
        rows, xp = [], torch.ones_like(x)
        for p in GRAM_POWERS:  # 1, 2, ...: each power one product more (pow is far slower)
            xp = xp * x
            r = (xp @ xp.sum(dim=1, keepdim=True).transpose(1, 2)).squeeze(2)
            rows.append(r.sign() * r.abs().pow(1 / p))
        per_stage.append(F.pad(torch.stack(rows, dim=1), (0, width - x.shape[1])))
    return torch.stack(per_stage, dim=1).to(stages[-1].dtype)


def _of_last_map(
    summary: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[Sequence[torch.Tensor]], torch.Tensor]:
    return lambda stages: summary(stages[-1])


# Each summary takes the maps of ``Classifier.forward_stages`` (the last one last).
MAP_SUMMARIES: dict[str, Callable[[Sequence[torch.Tensor]], torch.Tensor]] = {
    "regions": _of_last_map(region_vectors),
    "rank_one_removed": _of_last_map(rank_one_removed),
    "stage_means": stage_means,
    "gram_rows": gram_rows,
}
