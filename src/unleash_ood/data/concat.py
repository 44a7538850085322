"""Several datasets as one, each part fetched by its own ``__getitems__`` when a batch asks.

:class:`ConcatData` joins any :class:`~unleash_ood.data.base.ImageData` parts of one image
shape, in memory or streamed, without decoding or copying them: a batch is assembled from the
rows each part gives for its own indices. WOODS / SCONE's wild mix (:mod:`unleash_ood.method.wild`)
is one: ID training images (possibly files), noisy copies of others, and outliers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from unleash_ood.data.base import ImageData
from unleash_ood.data.streaming import sequential_batches


class ConcatData:
    """``parts`` one after another, as one :class:`~unleash_ood.data.base.ImageData`."""

    def __init__(self, name: str, parts: Sequence[ImageData]):
        if not parts:
            raise ValueError(f"{name}: no parts to join")
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"{name}: parts of different image shapes {sorted(shapes)}")
        self.name, self.parts = name, list(parts)
        self.offsets = np.cumsum([0, *(len(p) for p in self.parts)])
        self.labels = torch.cat([p.labels for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.parts[0].shape

    def _locate(self, index: np.ndarray) -> np.ndarray:
        """The part each index falls in."""
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"{self.name}: index out of range 0..{len(self) - 1}")
        return np.searchsorted(self.offsets, index, side="right") - 1

    def __getitems__(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A float batch of the rows at ``idx``, each part asked for its own rows once."""
        index = np.asarray(torch.as_tensor(idx, dtype=torch.int64))
        part = self._locate(index)
        x = torch.empty(len(index), *self.shape)
        for k in np.unique(part):
            rows = np.flatnonzero(part == k)
            x[torch.from_numpy(rows)] = self.parts[k].__getitems__(
                (index[rows] - self.offsets[k]).tolist()
            )[0]
        return x, self.labels[torch.from_numpy(index)]

    def batches(
        self, batch_size: int, workers: int = 0, pin_memory: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Sequential float batches, fetched in ``workers`` processes (0: here)."""
        return sequential_batches(self, batch_size, workers, pin_memory)

    def subset(self, index: torch.Tensor | np.ndarray, name: str | None = None) -> ConcatData:
        """The rows at ``index``, in its order: one part per run of indices in the same part."""
        index = np.asarray(torch.as_tensor(index, dtype=torch.int64))
        part = self._locate(index)
        cuts = np.flatnonzero(np.diff(part)) + 1
        runs = zip(np.split(index, cuts), np.split(part, cuts), strict=True)
        parts = [self.parts[p[0]].subset(i - self.offsets[p[0]]) for i, p in runs if len(i)]
        return ConcatData(name or self.name, parts or [self.parts[0].subset(index)])

    def with_labels(self, labels: torch.Tensor, name: str) -> ConcatData:
        """The same rows under other labels."""
        if len(labels) != len(self):
            raise ValueError(f"{self.name}: {len(self)} rows but {len(labels)} labels")
        bounds = zip(self.parts, self.offsets[:-1], self.offsets[1:], strict=True)
        parts = [p.with_labels(labels[a:b], p.name) for p, a, b in bounds]
        return ConcatData(name, parts)

    def fingerprint(self) -> str:
        """A digest of the parts' fingerprints, in order."""
        h = hashlib.blake2b(digest_size=12)
        for p in self.parts:
            h.update(p.fingerprint().encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"ConcatData({self.name!r}, n={len(self)}, parts={len(self.parts)})"
