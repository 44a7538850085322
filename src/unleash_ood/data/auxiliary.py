"""Auxiliary outliers for outlier-exposure training, from wherever a user keeps them.

``--aux`` names one source:

* ``bundled``: the embedded suite's own outliers (photographs no OOD set uses, and faces);
* a ``.npy`` file of uint8 images, ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``;
* a folder of downsampled-ImageNet batches, the format the POEM setting calls "ImageNet-RC"
  (Chrabaszcz et al. 2017: pickles or ``.npz`` files named ``*data_batch_*`` holding ``data``,
  ``N x 3*S*S`` uint8 rows laid out R-plane, G-plane, B-plane);
* any other folder: every image file under it.

A run keeps a seeded subset of ``limit`` images (the paper draws 50k per run), converted to the
benchmark's channels and size. The ImageNet batches (1.28M images) are streamed file by file,
keeping the ``limit`` rows with the smallest random keys, so memory stays near one batch file.
Each kept ImageNet image is cut to the benchmark's size as the Unleashing Mask code takes its
outliers (``data/imagenet_oe.py``: ``RandomCrop(32, padding=4)`` of the 64 x 64 images, once,
when they are drawn): a seeded random crop of the image zero-padded by 4, so an outlier is a
patch of about a quarter of the picture, not the whole picture shrunk (images too small for
that are resized). Every other source is resized whole. Deviation: their draw is 50k
consecutive images from a random offset, ours a uniform sample.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from unleash_ood.augment import random_crop
from unleash_ood.data.base import ImageSet, cached_array, to_format
from unleash_ood.data.bundled import AUX_SET
from unleash_ood.data.formats import iter_images, load_image_folder, load_pickle, signature
from unleash_ood.errors import UserError
from unleash_ood.rng import torch_generator

BUNDLED = "bundled"
BATCH_GLOB = "*data_batch_*"
CROP_PADDING = 4
HOW = (
    "pass bundled (to --aux or --wild), a .npy file of uint8 images, a folder of images, or a "
    "folder of downsampled-ImageNet batch files"
)


def _seeded_subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def read_npy_images(path: Path) -> np.ndarray:
    """A ``.npy`` array of uint8 images; never unpickles."""
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable .npy array ({e}); {HOW}") from None
    if array.dtype != np.uint8 or array.ndim not in (3, 4):
        raise UserError(
            f"{path}: expected uint8 images (N, H, W[, C]) or (N, C, H, W), got "
            f"{array.dtype} {array.shape}; save them as uint8 0-255"
        )
    return array


def read_imagenet_batch(path: Path) -> np.ndarray:
    """One downsampled-ImageNet batch file as uint8 ``(N, 3, S, S)``."""
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                data = z["data"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{path}: not a downsampled-ImageNet .npz ({e}); {HOW}") from None
    else:
        batch = load_pickle(path)
        data = batch.get("data", batch.get(b"data")) if isinstance(batch, dict) else None
        if data is None:
            raise UserError(f"{path}: no 'data' array in this batch file; {HOW}")
    data = np.asarray(data)
    side = round((data.shape[-1] / 3) ** 0.5) if data.ndim == 2 else 0
    if data.dtype != np.uint8 or side == 0 or 3 * side * side != data.shape[-1]:
        raise UserError(
            f"{path}: 'data' must be uint8 rows of 3*S*S pixels, got {data.dtype} "
            f"{data.shape}; {HOW}"
        )
    return data.reshape(-1, 3, side, side)


def padded_crops(data: np.ndarray, size: int, g: torch.Generator) -> np.ndarray:
    """Uint8 ``(N, C, S, S)`` cut to ``(N, C, size, size)`` by torchvision's ``RandomCrop(size,
    padding=4)`` (:func:`~unleash_ood.augment.random_crop`, offsets from ``g``). Left whole (to
    be resized) where ``S + 8 < size``."""
    if data.shape[-1] + 2 * CROP_PADDING < size:
        return data
    return random_crop(torch.from_numpy(data), CROP_PADDING, g, size).numpy()


def read_imagenet_batches(
    files: list[Path], limit: int | None, seed: int, size: int, channels: int
) -> torch.Tensor:
    """A uniform random subset of ``limit`` rows over all batch files, read one at a time, each
    cut by :func:`padded_crops` (its offsets drawn for every row, so they do not depend on
    which rows are kept)."""
    rng, crop_rng = np.random.default_rng(seed), torch_generator(seed, "aux-crop")
    keys = np.empty(0)
    kept = torch.empty(0, channels, size, size, dtype=torch.uint8)
    for path in files:
        data = padded_crops(read_imagenet_batch(path), size, crop_rng)
        k = rng.random(len(data))
        if limit is not None and len(keys) + len(k) > limit:
            # The limit smallest keys over everything seen so far are a uniform sample.
            threshold = np.partition(np.concatenate([keys, k]), limit - 1)[limit - 1]
            old, new = keys <= threshold, k <= threshold
        else:
            old, new = np.ones(len(keys), bool), np.ones(len(k), bool)
        keys = np.concatenate([keys[old], k[new]])
        kept = torch.cat([kept[torch.from_numpy(old)], to_format(data[new], size, channels)])
    return kept


def check_aux(source: str) -> None:
    """Refuse, in one line and before any work, a source :func:`load_aux` could not read: a
    missing path, a file that is not a ``.npy`` array of uint8 images (only its header is
    read), a folder with neither batch files nor images (the walk stops at the first). A batch
    file's contents are checked when it is read."""
    if source == BUNDLED:
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"outliers {source!r}: no such file or folder; {HOW}")
    if path.is_file():
        if path.suffix != ".npy":
            raise UserError(f"{path}: unknown outlier file type {path.suffix!r}; {HOW}")
        read_npy_images(path)
    elif not _batch_files(path) and next(iter_images(path), None) is None:
        raise UserError(f"{path}: holds neither image files nor ImageNet batch files; {HOW}")


def _batch_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob(BATCH_GLOB) if p.is_file())


def load_aux(
    source: str, size: int, channels: int, limit: int | None = None, seed: int = 0
) -> ImageSet:
    """The auxiliary outliers named by ``source`` (see the module docstring), ``limit`` of them."""
    check_aux(source)
    if source == BUNDLED:
        images = to_format(AUX_SET.load(), size, channels)
        return ImageSet("aux-bundled", images[_seeded_subset(len(images), limit, seed)])
    path = Path(source).expanduser()
    if path.is_file():
        array = read_npy_images(path)
        index = _seeded_subset(len(array), limit, seed)
        return ImageSet(f"aux-{path.stem}", to_format(np.asarray(array[index]), size, channels))
    batches = _batch_files(path)
    if batches:
        # Reading 1.28M images takes minutes: the drawn subset is cached, keyed by the files.
        key = f"aux/{path.name}-{limit}-{seed}-crop-{signature(batches, size, channels)}"
        images = cached_array(
            key, lambda: read_imagenet_batches(batches, limit, seed, size, channels).numpy()
        )
        return ImageSet(f"aux-{path.name}", torch.from_numpy(images))
    return ImageSet(f"aux-{path.name}", load_image_folder(path, size, channels, limit, seed))
