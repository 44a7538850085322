"""Readers for the on-disk formats the standard OOD benchmarks are published in.

Every reader returns uint8 images ``(N, C, H, W)`` (plus int64 labels where the format has
them), so :class:`~unleash_ood.data.base.ImageSet` can hold them without conversion:

* CIFAR-10 / CIFAR-100 in both published forms, the Python pickles and the binary records.
  The pickles go through :class:`SafeUnpickler`, which can only rebuild numpy arrays: a
  dataset file from the internet must never be able to run code.
* SVHN's MATLAB files (``test_32x32.mat``), whose label 10 means digit 0.
* IDX files (MNIST and relatives), plain or gzipped.
* Folders and lists of image files, decoded with PIL once and then cached as ``.npy``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import re
import warnings
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import scipy.io
import torch
from PIL import Image
from tqdm import tqdm

from unleash_ood.data.base import cached_array
from unleash_ood.errors import UserError
from unleash_ood.progress import show_decoding_bars

# --------------------------------------------------------------------------- restricted pickle


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a pickled numpy array needs, under numpy 1.x and 2.x module names.

    The objects are taken from numpy's own ``__reduce_ex__`` rather than imported by name, so
    they are right for the installed version whichever module name a file was written with.
    """
    reconstruct = np.zeros(1).__reduce_ex__(2)[0]  # protocols 0-4
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5 (Python >= 3.14's default)
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, and refuses every other global.

    A pickle can call any importable function while it loads (``os.system`` included);
    allowing only numpy's array reconstruction makes loading a tampered file fail instead.
    ``encoding="bytes"`` is how the Python 2 CIFAR pickles must be read.
    """

    ALLOWED = _numpy_globals()

    def __init__(self, file: BinaryIO, source: str):
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise UserError(
                f"{self.source}: refusing to unpickle {module}.{name} (only numpy "
                "arrays are allowed); replace the file with the original "
                "download"
            ) from None


def load_pickle(path: Path) -> object:
    """Load a pickle with :class:`SafeUnpickler`; a broken file is a :class:`UserError`."""
    with open(path, "rb") as f:
        try:
            return SafeUnpickler(f, str(path)).load()
        except UserError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise UserError(f"{path}: not a readable pickle ({e}); download it again") from None


# --------------------------------------------------------------------------- CIFAR

CIFAR_RECORD = 3 * 32 * 32


@dataclass(frozen=True)
class CifarLayout:
    """One of the four published CIFAR distributions: its file names and where labels sit.

    ``label_bytes`` is 0 for the pickle format, else the label bytes before each binary record
    (CIFAR-100 stores coarse then fine; the fine label is the last one).
    """

    train: tuple[str, ...]
    test: str
    meta: str
    label_key: bytes = b""
    names_key: bytes = b""
    label_bytes: int = 0


CIFAR_LAYOUTS = (
    CifarLayout(
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
    ),
    CifarLayout(
        ("train",), "test", "meta", label_key=b"fine_labels", names_key=b"fine_label_names"
    ),
    CifarLayout(
        tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        "test_batch.bin",
        "batches.meta.txt",
        label_bytes=1,
    ),
    CifarLayout(("train.bin",), "test.bin", "fine_label_names.txt", label_bytes=2),
)


def cifar_layout(folder: Path) -> CifarLayout | None:
    """Which CIFAR distribution ``folder`` holds, told by its test file; None if none."""
    return next((lay for lay in CIFAR_LAYOUTS if (folder / lay.test).is_file()), None)


def read_cifar_pickle(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR batch: ``b"data"`` (N, 3072) channel-major, labels under ``label_key``."""
    batch = load_pickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise UserError(
            f"{path}: not a CIFAR batch (no b'data' / {label_key!r}); download it again"
        )
    data, labels = batch[b"data"], np.asarray(batch[label_key], dtype=np.int64)
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != CIFAR_RECORD
        or labels.shape != (data.shape[0],)
    ):
        raise UserError(f"{path}: CIFAR batch of unexpected shape; download it again")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar_bin(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """One binary CIFAR file: records of ``label_bytes`` label bytes + 3072 pixel bytes."""
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + CIFAR_RECORD
    if raw.size == 0 or raw.size % record:
        raise UserError(
            f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR "
            "records; download it again"
        )
    raw = raw.reshape(-1, record)
    images = np.ascontiguousarray(raw[:, label_bytes:]).reshape(-1, 3, 32, 32)
    return images, raw[:, label_bytes - 1].astype(np.int64)


def read_cifar_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``"train"`` or ``"test"`` split of a CIFAR folder in any of its four layouts."""
    layout = cifar_layout(folder)
    if layout is None:
        tests = ", ".join(lay.test for lay in CIFAR_LAYOUTS)
        raise UserError(
            f"{folder}: no CIFAR test file ({tests}) found; unpack the original CIFAR archive there"
        )
    files = layout.train if split == "train" else (layout.test,)
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"{folder}: CIFAR files missing: {', '.join(missing)}; unpack the complete archive"
        )
    parts = [
        read_cifar_bin(folder / name, layout.label_bytes)
        if layout.label_bytes
        else read_cifar_pickle(folder / name, layout.label_key)
        for name in files
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_cifar_class_names(folder: Path) -> tuple[str, ...]:
    """Class names from the CIFAR meta file, or ``()`` when it is absent."""
    layout = cifar_layout(folder)
    if layout is None or not (folder / layout.meta).is_file():
        return ()
    path = folder / layout.meta
    if layout.label_bytes:
        return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    meta = load_pickle(path)
    names = meta.get(layout.names_key, []) if isinstance(meta, dict) else []
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


# --------------------------------------------------------------------------- SVHN and IDX


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN's ``*_32x32.mat``: X (32, 32, 3, N), y (N, 1) with 10 for the digit 0."""
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except (OSError, ValueError, NotImplementedError, scipy.io.matlab.MatReadError) as e:
        raise UserError(f"{path}: not a readable SVHN .mat file ({e}); download it again") from e
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise UserError(
            f"{path}: SVHN file without X (32, 32, 3, N) and y (N, 1); download it again"
        )
    labels = y.reshape(-1).astype(np.int64)
    labels[labels == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1), dtype=np.uint8), labels


IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open_maybe_gzip(path: Path) -> BinaryIO:
    """Open plain or gzipped files alike, told by content (the ``.gz`` suffix is not needed)."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST family's format), plain or gzipped, as a native-endian array.

    Header: two zero bytes, a type code, the number of dimensions, then each dimension as a
    big-endian uint32. The payload length is checked against the shape, so a truncated
    download fails here rather than as a reshape error later.
    """
    try:
        with _open_maybe_gzip(path) as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as e:
        raise UserError(f"{path} is damaged ({e}); download it again") from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_DTYPES:
        raise UserError(f"{path}: not an IDX file (bad magic number); download it again")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    if len(raw) - header != int(np.prod(shape)) * dtype.itemsize:
        raise UserError(f"{path}: IDX payload does not match its shape {shape}; download it again")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def read_idx_pair(
    images_file: Path, labels_file: Path, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, H, W)`` uint8 and labels ``(N,)`` int64 from an IDX pair, checked to agree:
    a damaged or mismatched download fails here, with the file named, not mid-epoch."""
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise UserError(
            f"{images_file}: expected IDX images of shape (N, H, W) and type uint8, got "
            f"{images.dtype} {images.shape}; download it again"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise UserError(
            f"{labels_file}: expected IDX labels of shape (N,) and an integer type, got "
            f"{labels.dtype} {labels.shape}; download it again"
        )
    if len(images) != len(labels):
        raise UserError(
            f"{images_file.name} holds {len(images):,} images but {labels_file.name} "
            f"{len(labels):,} labels; download the pair again"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(
            f"{labels_file}: a label is outside 0..{num_classes - 1} ({int(labels.max())}); "
            f"download it again"
        )
    return images, labels.astype(np.int64)


def find_idx(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists (both forms are distributed)."""
    return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)


# --------------------------------------------------------------------------- image files

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
CACHE_VERSION = "v1"  # bump when decoding changes, so stale caches are not reused


def iter_images(folder: Path) -> Iterator[Path]:
    """Image files under ``folder`` (recursive, symlinks followed) in the order found.

    Each real folder is walked once: a symlink back to a folder already walked (a cycle, or
    two links to one folder) is not entered again, so no image is counted twice. The
    filesystem root is refused, as a folder given by mistake. Hidden files are skipped:
    archives packed on macOS carry ``._name.jpg`` resource forks that look like images but
    are not.
    """
    resolved = folder.resolve()
    if resolved == Path(resolved.anchor):
        raise UserError(f"{folder}: is the filesystem root; name the folder that holds the images")
    walked: set[tuple[int, int]] = set()
    for dirpath, dirnames, names in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in walked:
            dirnames.clear()
            continue
        walked.add((st.st_dev, st.st_ino))
        for name in names:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(dirpath, name)


def list_images(folder: Path) -> list[Path]:
    """:func:`iter_images`, sorted for determinism."""
    return sorted(iter_images(folder), key=lambda p: p.as_posix())


def read_imglist(list_file: Path, base: Path) -> list[Path]:
    """Files named by an OpenOOD-style image list (``relative/path label`` per line)."""
    lines = list_file.read_text().splitlines()
    return [base / line.split()[0] for line in lines if line.strip()]


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the short side to ``size`` (bilinear) and cut the centre ``size`` x ``size``.

    The same as torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on PIL images, which is
    OpenOOD's test preprocessing: the aspect ratio is kept, so textures and scenes are not
    squashed, and images already ``size`` pixels on the short side are only cropped.
    """
    w, h = img.size
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BILINEAR)
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)
    return img.crop((left, top, left + size, top + size))


def decode_image(path: Path, size: int, channels: int) -> np.ndarray | None:
    """One file as uint8 ``(channels, size, size)``, or None if it cannot be decoded."""
    try:
        with Image.open(path) as img:
            img = resize_center_crop(img.convert("L" if channels == 1 else "RGB"), size)
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError):
        return None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _decode_all(paths: Sequence[Path], size: int, channels: int, name: str) -> np.ndarray:
    """Decode in threads (PIL releases the GIL) with a progress bar (unless
    :func:`~unleash_ood.progress.decoding_bars` hides it); skip unreadable files."""
    out = np.empty((len(paths), channels, size, size), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        decoded = pool.map(lambda p: decode_image(p, size, channels), paths)
        for i, image in enumerate(
            tqdm(
                decoded,
                total=len(paths),
                desc=f"decoding {name}",
                unit="img",
                disable=not show_decoding_bars(),
            )
        ):
            if image is not None:
                out[i], ok[i] = image, True
    if not ok.any():
        raise UserError(
            f"{name}: none of the {len(paths)} image files could be decoded (first: "
            f"{paths[0]}); check that the download is complete"
        )
    if not ok.all():
        first_bad = paths[int(np.flatnonzero(~ok)[0])]
        warnings.warn(
            f"{name}: skipped {int((~ok).sum())} of {len(paths)} unreadable image "
            f"files (first: {first_bad})",
            stacklevel=3,
        )
    return out[ok]


def signature(paths: Sequence[Path], size: int, channels: int) -> str:
    """A digest of what the decoded array depends on: which files, their sizes and times.

    Adding, removing, renaming or rewriting a file changes it, so a stale cache is never used.
    """
    stats = [p.stat() for p in paths]
    digest = hashlib.sha256()
    digest.update("\n".join(str(p.absolute()) for p in paths).encode())
    digest.update(
        f"|{len(paths)}|{sum(s.st_size for s in stats)}|"
        f"{max(s.st_mtime_ns for s in stats)}|{size}|{channels}|{CACHE_VERSION}".encode()
    )
    return digest.hexdigest()[:24]


def load_images(paths: Sequence[Path], size: int, channels: int, name: str) -> torch.Tensor:
    """Decode image files to uint8 ``(N, channels, size, size)``, cached under ``cache_dir()``.

    Decoding tens of thousands of JPEGs takes minutes; loading the cached ``.npy`` takes
    well under a second, and never unpickles.
    """
    if not paths:
        raise UserError(f"{name}: no image files to load")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(
            f"{name}: {len(missing)} of {len(paths)} listed image files are missing "
            f"(first: {missing[0]}); unpack the complete archive"
        )
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name)
    key = f"images/{slug}-{size}x{size}x{channels}-{signature(paths, size, channels)}"
    return torch.from_numpy(cached_array(key, lambda: _decode_all(paths, size, channels, name)))


def load_image_folder(
    folder: Path, size: int, channels: int, limit: int | None = None, seed: int = 0
) -> torch.Tensor:
    """All images under ``folder`` (see :func:`list_images`), or ``limit`` of them.

    With ``limit``, the files kept are the first ``limit`` of a seeded shuffle (then put back in
    path order), so huge folders such as Places365 give the same subset on every machine.
    """
    paths = list_images(folder)
    if not paths:
        raise UserError(
            f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found; "
            "unpack the dataset there"
        )
    if limit is not None and len(paths) > limit:
        keep = np.sort(np.random.default_rng(seed).permutation(len(paths))[:limit])
        paths = [paths[i] for i in keep]
    return load_images(paths, size, channels, "/".join(folder.parts[-2:]))
