"""Image files decoded lazily, batch by batch, in DataLoader workers: data too large to hold.

:class:`ImageFiles` keeps only the file names and labels; each batch is decoded with Pillow
when it is asked for, in ``workers`` processes, so memory does not grow with the number of
images. It offers what :class:`~unleash_ood.data.base.ImageSet` offers (the
:class:`~unleash_ood.data.base.ImageData` contract), so the evaluator and the trainer take
either. Three ways to name the files:

* :func:`folder_files`: every image under a plain folder, unlabelled (OOD data);
* :func:`class_folder_files`: torchvision's ImageFolder layout, one sub-folder per class;
* :func:`imglist_files`: OpenOOD v1.5's ``benchmark_imglist`` files, ``relative/path label``
  per line, relative to a data root.

Files are untrusted: a missing file is reported before any decoding, a file that cannot be
decoded stops the run with its name (the in-memory readers skip such files with a warning;
here a skipped file would silently change which images a cached result belongs to).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from unleash_ood.data.base import ImageData
from unleash_ood.data.formats import IMAGE_SUFFIXES, list_images, resize_center_crop
from unleash_ood.errors import UserError

DECODE_VERSION = "v1"  # bump when decoding changes, so cached outputs are not reused


def decode_file(path: str, size: int, channels: int, pre_size: int | None = None) -> np.ndarray:
    """One file as uint8 ``(channels, size, size)``: the short side scaled to ``pre_size``
    (default ``size``), then the centre ``size`` x ``size`` cut (torchvision's ``Resize`` +
    ``CenterCrop``, OpenOOD's test preprocessing). A file Pillow cannot read is a
    :class:`UserError` naming it."""
    try:
        with Image.open(path) as img:
            img = resize_center_crop(img.convert("L" if channels == 1 else "RGB"), pre_size or size)
            if img.size != (size, size):
                img = resize_center_crop(img, size)
            array = np.array(img, dtype=np.uint8)  # a writable copy, unlike np.asarray
    except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not a readable image ({e}); replace or remove the file") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


class ImageFiles(Dataset):
    """A named list of image files with int64 labels (``-1`` = no class), decoded on demand
    to float ``(C, size, size)`` in [0, 1] (see :func:`decode_file`)."""

    def __init__(
        self,
        name: str,
        paths: Sequence[str | Path],
        labels: torch.Tensor | Sequence[int] | None = None,
        size: int = 32,
        channels: int = 3,
        pre_size: int | None = None,
    ):
        self.name = name
        self.paths = [str(p) for p in paths]
        if labels is None:
            labels = torch.full((len(self.paths),), -1, dtype=torch.int64)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        if self.labels.shape != (len(self.paths),):
            raise ValueError(f"{name}: {len(self.paths)} files but {len(self.labels)} labels")
        self.size, self.channels, self.pre_size = size, channels, pre_size

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def decode(self, idx: Sequence[int]) -> torch.Tensor:
        """uint8 ``(len(idx), C, size, size)`` of the files at ``idx``."""
        out = np.empty((len(idx), *self.shape), dtype=np.uint8)
        for row, i in enumerate(idx):
            out[row] = decode_file(self.paths[i], self.size, self.channels, self.pre_size)
        return torch.from_numpy(out)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode([i])[0].float().div_(255), self.labels[i]

    def __getitems__(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A float batch of the files at ``idx``, decoded in this process (the trainer's
        access; evaluation goes through :meth:`batches`, which decodes in workers)."""
        index = torch.as_tensor(idx, dtype=torch.int64)
        return self.decode(index.tolist()).float().div_(255), self.labels[index]

    def batches(
        self, batch_size: int, workers: int = 0, pin_memory: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Sequential float batches in [0, 1], decoded in ``workers`` processes (0: here),
        in page-locked memory when ``pin_memory`` so copies to a GPU can overlap compute."""
        return sequential_batches(self, batch_size, workers, pin_memory)

    def subset(self, index: torch.Tensor | np.ndarray, name: str | None = None) -> ImageFiles:
        index = torch.as_tensor(index, dtype=torch.int64)
        return ImageFiles(
            name or self.name,
            [self.paths[i] for i in index.tolist()],
            self.labels[index],
            self.size,
            self.channels,
            self.pre_size,
        )

    def with_labels(self, labels: torch.Tensor, name: str) -> ImageFiles:
        """The same files under other labels (e.g. with label noise)."""
        return ImageFiles(name, self.paths, labels, self.size, self.channels, self.pre_size)

    def fingerprint(self) -> str:
        """A digest of the file list, labels and decoding: equal for the same files, whatever
        the name, computed without reading any image (a file rewritten in place under the same
        name is not noticed; give the cache a fresh folder after editing data)."""
        h = hashlib.blake2b(digest_size=12)
        h.update(f"{self.shape}|{self.pre_size}|{DECODE_VERSION}|".encode())
        h.update("\n".join(self.paths).encode())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"ImageFiles({self.name!r}, n={len(self)}, shape={self.shape})"


def load_batches(
    data: ImageData, index: Iterable[Sequence[int]], workers: int = 0, pin_memory: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``data.__getitems__`` of each index batch, fetched ahead in ``workers`` processes
    (0: here, on demand) and pinned when ``pin_memory``: the evaluator's sequential batches and
    the trainer's shuffled ones alike. A :class:`UserError` in a worker (a file that cannot be
    decoded) is raised here with its own one-line message."""
    loader = DataLoader(
        _Fetch(data),
        batch_sampler=index,
        num_workers=workers,
        pin_memory=pin_memory,
        collate_fn=_as_is,
    )
    for x, y, error in loader:
        if error:
            raise UserError(error)
        yield x, y


def sequential_batches(
    data: ImageData, batch_size: int, workers: int = 0, pin_memory: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``data`` in order, ``batch_size`` at a time, through :func:`load_batches`: the
    ``batches`` of every lazily fetched dataset."""
    starts = range(0, len(data), batch_size)
    index = (range(s, min(s + batch_size, len(data))) for s in starts)
    return load_batches(data, index, workers, pin_memory)


class _Fetch(Dataset):
    """What the DataLoader workers run: a batch, its labels, and the message of a
    :class:`UserError` ('' if none), so that it reaches the user as one line rather than as a
    worker's traceback."""

    def __init__(self, data: ImageData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, str]:
        try:
            x, y = self.data.__getitems__(idx)
        except UserError as e:
            return torch.empty(0), torch.empty(0), str(e)
        return x, y, ""


def _as_is(batch: tuple) -> tuple:
    """The DataLoader's collate step: :meth:`_Fetch.__getitems__` already made the batch."""
    return batch


# --------------------------------------------------------------------------- naming the files


def folder_files(
    folder: Path, name: str, size: int, channels: int, pre_size: int | None = None
) -> ImageFiles:
    """Every image under ``folder`` (recursive, sorted), unlabelled."""
    paths = list_images(folder)
    if not paths:
        raise UserError(
            f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found; "
            "put the images there"
        )
    return ImageFiles(name, paths, None, size, channels, pre_size)


def class_folder_files(
    folder: Path,
    name: str,
    size: int,
    channels: int,
    classes: Sequence[str] = (),
    pre_size: int | None = None,
) -> tuple[ImageFiles, tuple[str, ...]]:
    """torchvision's ImageFolder layout: ``folder/<class>/**/image``. Classes are ``classes``
    in that order when given (every sub-folder must be one of them), else the sorted
    sub-folder names. Returns the files and the class names."""
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist (or is not a folder)")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise UserError(f"{folder}: no class sub-folders (ImageFolder layout: {folder}/<class>/)")
    names = tuple(classes) or tuple(found)
    unknown = [c for c in found if c not in names]
    if unknown:
        raise UserError(
            f"{folder}: sub-folder {unknown[0]!r} is not one of the benchmark's classes; "
            "remove it or add it to the class list"
        )
    paths, labels = [], []
    for label, cls in enumerate(names):
        if (folder / cls).is_dir():
            files = list_images(folder / cls)
            paths += files
            labels += [label] * len(files)
    if not paths:
        raise UserError(f"{folder}: no image files in its class sub-folders")
    return ImageFiles(name, paths, labels, size, channels, pre_size), names


def imglist_files(
    list_file: Path,
    root: Path,
    name: str,
    size: int,
    channels: int,
    labelled: bool = True,
    num_classes: int | None = None,
    pre_size: int | None = None,
) -> ImageFiles:
    """An OpenOOD v1.5 image list: ``relative/path label`` per line, paths relative to
    ``root``. Every line is checked, and every listed file must exist, before any decoding.
    With ``labelled`` false (OOD sets) the labels in the file are ignored."""
    if not list_file.is_file():
        raise UserError(f"image list {list_file} not found")
    paths, labels = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if labelled:
            label = fields[1] if len(fields) > 1 else ""
            if not label.lstrip("-").isdigit() or (
                num_classes is not None and not 0 <= int(label) < num_classes
            ):
                top = f"0..{num_classes - 1}" if num_classes else "an integer"
                raise UserError(
                    f"{list_file}:{number}: expected 'path label' with a label in {top}, "
                    f"got {line.strip()!r}"
                )
            labels.append(int(label))
        paths.append(root / fields[0])
    if not paths:
        raise UserError(f"image list {list_file} names no files")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(
            f"{list_file}: {len(missing)} of {len(paths)} listed files are missing under {root} "
            f"(first: {missing[0]}); check the data root"
        )
    return ImageFiles(name, paths, labels if labelled else None, size, channels, pre_size)
