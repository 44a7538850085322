"""Which ID training data a run fits: all of it or a seeded class-stratified subset, with an
optional seeded fraction of symmetric label flips.

Label noise tests the paper's premise where it holds by construction: a flipped sample can be
fitted only by memorising it, so it is an "atypical" sample whose identity is known. Only the
training labels change; validation and test labels never do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from unleash_ood.data.base import ImageData
from unleash_ood.errors import UserError
from unleash_ood.rng import numpy_rng


@dataclass(frozen=True)
class TrainingData:
    """``size``: keep that many training images (stratified per class, seeded; None = all).
    ``label_noise``: the fraction of kept images whose label is replaced by a uniformly drawn
    *other* class (so exactly that fraction is wrong). ``seed`` keys both draws."""

    size: int | None = None
    label_noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size is not None and (not isinstance(self.size, int) or self.size < 1):
            raise UserError(
                f"the training subset size must be a positive integer, not {self.size!r}"
            )
        noise = self.label_noise
        if not isinstance(noise, int | float) or not 0 <= noise < 1:
            raise UserError(f"--label-noise must be a fraction in [0, 1), not {noise!r}")
        if not isinstance(self.seed, int):
            raise UserError(f"the training-data seed must be an integer, not {self.seed!r}")

    @property
    def is_full(self) -> bool:
        return self.size is None and self.label_noise == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> TrainingData:
        """From a checkpoint sidecar (untrusted): only the known keys, each validated."""
        if d is None:
            return cls()
        if not isinstance(d, dict) or set(d) - {"size", "label_noise", "seed"}:
            raise UserError(f"the checkpoint's training-data record is malformed: {d!r}")
        return cls(**d)

    def apply(self, train: ImageData) -> tuple[ImageData, np.ndarray]:
        """The training set this spec describes, and the indices (into it) of flipped labels."""
        if self.is_full:
            return train, np.zeros(0, dtype=np.int64)
        labels = train.labels.numpy()
        if self.size is not None:
            if self.size > len(train):
                raise UserError(
                    f"the training subset ({self.size:,}) is larger than the training set "
                    f"({len(train):,})"
                )
            train = train.subset(stratified_subset(labels, self.size, self.seed))
            labels = train.labels.numpy()
        if self.label_noise == 0:
            return train, np.zeros(0, dtype=np.int64)
        noisy, flipped = flip_labels(labels, self.label_noise, self.seed)
        name = f"{train.name}-noise{self.label_noise:g}"
        return train.with_labels(torch.from_numpy(noisy), name), flipped


def stratified_subset(
    labels: np.ndarray, size: int, seed: int, stream: str = "subset"
) -> np.ndarray:
    """Sorted indices of ``size`` samples, each class kept in proportion (largest remainders),
    drawn from the random stream ``stream`` of ``seed`` (:mod:`unleash_ood.rng`)."""
    rng = numpy_rng(seed, stream)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * size / len(labels)
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take), kind="stable")[: size - take.sum()]] += 1
    picked = [
        rng.choice(np.flatnonzero(labels == c), k, replace=False)
        for c, k in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(picked))


def flip_labels(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric label noise: ``round(fraction * n)`` seeded samples get a uniformly drawn other
    class. Returns the new labels and the sorted flipped indices."""
    rng = numpy_rng(seed, "label-noise")
    n_classes = int(labels.max()) + 1
    if n_classes < 2:
        raise UserError("label noise needs at least two classes")
    flipped = np.sort(rng.choice(len(labels), round(fraction * len(labels)), replace=False))
    shift = rng.integers(1, n_classes, size=len(flipped))
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + shift) % n_classes
    return noisy, flipped
