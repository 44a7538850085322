"""In-memory image sets, the benchmark bundle, and where data is looked for.

Every dataset, whatever its on-disk format, becomes an :class:`ImageSet`: uint8 images
``(N, C, H, W)`` at the benchmark's resolution plus int64 labels (``-1`` for OOD data). Keeping
uint8 in memory makes a 50k-image set 150 MB at 32x32x3 and lets batches be sliced without a
per-sample Python loop, which is what keeps evaluation close to the cost of a forward pass.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from unleash_ood.errors import UserError


class ImageData(Protocol):
    """What the evaluator and the trainer ask of a dataset: :class:`ImageSet` (decoded, in
    memory) and :class:`~unleash_ood.data.streaming.ImageFiles` (decoded lazily) both offer it.

    ``labels`` are int64 (``-1`` = no class); batches are float ``(B, C, H, W)`` in [0, 1].
    """

    name: str
    labels: torch.Tensor

    def __len__(self) -> int: ...

    @property
    def shape(self) -> tuple[int, int, int]: ...

    def __getitems__(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def batches(
        self, batch_size: int, workers: int = 0, pin_memory: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def subset(self, index: torch.Tensor | np.ndarray, name: str | None = None) -> ImageData: ...

    def with_labels(self, labels: torch.Tensor, name: str) -> ImageData: ...

    def fingerprint(self) -> str: ...


class ImageSet(Dataset):
    """A named set of uint8 images ``(N, C, H, W)`` with int64 labels (``-1`` = no class)."""

    def __init__(self, name: str, images: torch.Tensor, labels: torch.Tensor | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"{name}: images must be uint8 (N, C, H, W), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if labels is None:
            labels = torch.full((images.shape[0],), -1, dtype=torch.int64)
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{name}: {images.shape[0]} images but {labels.shape[0]} labels")
        self.name = name
        self.images = images
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i].float().div_(255), self.labels[i]

    def __getitems__(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched fetch (a DataLoader uses it when present): one gather, not a Python loop."""
        index = torch.as_tensor(idx, dtype=torch.int64)
        return self.images[index].float().div_(255), self.labels[index]

    def batches(
        self, batch_size: int, workers: int = 0, pin_memory: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Sequential float batches in [0, 1], for evaluation. Slicing decoded images needs no
        workers (``workers`` is accepted for the :class:`ImageData` contract); ``pin_memory``
        puts each batch in page-locked memory for asynchronous copies to a GPU."""
        for start in range(0, len(self), batch_size):
            end = start + batch_size
            x = self.images[start:end].float().div_(255)
            yield (x.pin_memory() if pin_memory else x), self.labels[start:end]

    def subset(self, index: torch.Tensor | np.ndarray, name: str | None = None) -> ImageSet:
        index = torch.as_tensor(index, dtype=torch.int64)
        return ImageSet(name or self.name, self.images[index], self.labels[index])

    def with_labels(self, labels: torch.Tensor, name: str) -> ImageSet:
        """The same images under other labels (e.g. with label noise)."""
        return ImageSet(name, self.images, labels)

    def fingerprint(self) -> str:
        """A digest of the images and labels: equal for equal data, whatever its name."""
        h = hashlib.blake2b(digest_size=12)
        h.update(str(tuple(self.images.shape)).encode())
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(self.labels.contiguous().numpy().tobytes())
        return h.hexdigest()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"ImageSet({self.name!r}, n={len(self)}, shape={self.shape})"


@dataclass
class Benchmark:
    """An ID task with its splits and named OOD validation / test sets.

    ``ood_val`` is for model and hyper-parameter selection; ``ood_test`` only for reporting.
    """

    name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    id_train: ImageData
    id_val: ImageData
    id_test: ImageData
    ood_test: dict[str, ImageData]
    ood_val: dict[str, ImageData] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    # OOD test sets reported per set but left out of the headline mean (e.g. synthetic noise,
    # whose AUROC swings by tens of points between neighbouring epochs).
    excluded_from_mean: tuple[str, ...] = ()
    # Named groups of OOD test sets with their own mean, e.g. OpenOOD's {"near": ..., "far": ...}.
    ood_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.id_train.shape

    def sizes(self) -> dict[str, int]:
        out = {
            "id_train": len(self.id_train),
            "id_val": len(self.id_val),
            "id_test": len(self.id_test),
        }
        out.update({f"ood_val/{k}": len(v) for k, v in self.ood_val.items()})
        out.update({f"ood_test/{k}": len(v) for k, v in self.ood_test.items()})
        return out


# Where Debian's dataset packages (e.g. dataset-fashion-mnist) install their files.
SYSTEM_DATA_ROOTS = (Path("/usr/share/datasets"),)


def data_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for datasets, in order: the flag, ``$UNLEASH_DATA``, system locations."""
    roots: list[Path] = []
    if data_dir:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise UserError(f"--data-dir {data_dir} does not exist (or is not a folder)")
        roots.append(folder)
    if os.environ.get("UNLEASH_DATA"):
        roots.append(Path(os.environ["UNLEASH_DATA"]).expanduser())
    return [*roots, *SYSTEM_DATA_ROOTS]


def cache_dir() -> Path:
    """Where derived data (decoded folders, deterministic crops) is cached."""
    if os.environ.get("UNLEASH_CACHE"):
        return Path(os.environ["UNLEASH_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "unleash-ood"


def missing_data_error(
    what: str, roots: Sequence[Path], candidates: Sequence[str], how: str
) -> UserError:
    tried = ", ".join(str(r / c) for r in roots for c in candidates)
    return UserError(f"{what} not found (tried {tried}); {how}")


def to_format(images: np.ndarray | torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Bring uint8 ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` to ``(N, C, size, size)``.

    Resizing uses antialiased bilinear interpolation, so downscaling does not alias; RGB to
    grey uses the ITU-R 601 luma weights, grey to RGB repeats the channel.
    """
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4:
        raise ValueError(f"expected a stack of images, got shape {tuple(x.shape)}")
    x = x[:, :3]
    if x.shape[1] != channels:
        if channels == 1:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        else:
            x = x.expand(-1, channels, -1, -1)
    if x.shape[-2:] != (size, size):
        out = []
        for chunk in x.split(4096):
            y = F.interpolate(
                chunk.float(),
                size=(size, size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            out.append(y.round().clamp(0, 255).to(torch.uint8))
        x = torch.cat(out)
    return x.contiguous()


def stratified_holdout(
    labels: torch.Tensor, n_holdout: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (kept, held out) with ``n_holdout`` spread evenly over the classes.

    Seeded and independent of torch's global RNG, so the same split comes back every run.
    """
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    classes = np.unique(y)
    per_class = np.full(classes.size, n_holdout // classes.size)
    per_class[: n_holdout % classes.size] += 1
    held = np.concatenate(
        [
            rng.permutation(np.flatnonzero(y == c))[:k]
            for c, k in zip(classes, per_class, strict=True)
        ]
    )
    kept = np.setdiff1d(np.arange(y.size), held)
    return torch.from_numpy(kept), torch.from_numpy(np.sort(held))


def cached_array(key: str, build: Callable[[], np.ndarray]) -> np.ndarray:
    """Load ``key`` from the cache, or build it and store it atomically (temp file + rename).

    Loading never unpickles (``allow_pickle=False``), so a tampered cache cannot run code.
    """
    path = cache_dir() / f"{key}.npy"
    if path.exists():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # a truncated or foreign file: rebuild it
    array = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, array, allow_pickle=False)
    os.replace(tmp, path)
    return array
