"""CIFAR-10 / CIFAR-100 benchmarks: the paper's OOD suites and OpenOOD v1.5's near/far split.

Suites (registered on import; nothing is read until ``SuiteInfo.load``):

* ``cifar10`` / ``cifar100``: the Unleashing Mask paper's OOD test sets, the other CIFAR plus
  iNaturalist, SUN, Places365, Textures, LSUN (crop) and SVHN. Sets that are not on disk are
  left out with a warning; the ID data and at least one OOD set are required.
* ``cifar10-openood`` / ``cifar100-openood``: OpenOOD v1.5, near = other CIFAR + TinyImageNet,
  far = MNIST, SVHN, Textures, Places365. Every set is required, since group means over a
  partial list would not compare with published numbers. When OpenOOD's own
  ``benchmark_imglist/<id>/test_<set>.txt`` lists sit next to ``images_classic`` in a data root,
  exactly the listed images are used (OpenOOD removed TIN and Places365 images that overlap
  CIFAR classes); otherwise whole folders are used, with a warning.

Splits: ``id_val`` is 5,000 training images held out evenly over the classes (seeded, the same
every run), ``id_train`` the other 45,000, ``id_test`` the official test split. The OOD
validation set, used for tuning as in the paper, is TinyImageNet's ``test/`` folder, while a TIN
OOD *test* set is its ``val/`` folder (which is what OpenOOD's test lists draw from), so the two
never share an image. A TIN copy without both sub-folders is split into two disjoint seeded
halves instead. With OpenOOD's lists, ``val_tin.txt`` is the validation set.

All images are brought to 32x32 RGB; image files are resized on the short side and centre
cropped (see :func:`~unleash_ood.data.formats.resize_center_crop`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unleash_ood.data.base import (
    Benchmark,
    ImageSet,
    missing_data_error,
    stratified_holdout,
    to_format,
)
from unleash_ood.data.formats import (
    cifar_layout,
    find_idx,
    load_image_folder,
    load_images,
    read_cifar_class_names,
    read_cifar_split,
    read_idx,
    read_imglist,
    read_svhn_mat,
)
from unleash_ood.data.registry import DatasetInfo, SuiteInfo, register_dataset, register_suite
from unleash_ood.errors import UserError

SIZE, CHANNELS = 32, 3
N_VAL = 5000  # held-out training images; capped at a tenth of the set for small copies
SPLIT_SEED = 0
SUBSET_SEED = 0  # for subsets of image folders (Places365 limit, TIN halves)
PLACES_LIMIT = 10_000  # the size of the MOS/Energy Places subsets; full Places365 has 1.8M
WHERE = "under --data-dir or $UNLEASH_DATA"

Reader = Callable[[Path], torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """One published on-disk form of a dataset: where it may sit and how its images are read.

    ``read`` returns uint8 ``(N, 3, 32, 32)``; ``accepts`` tells a real copy from a bare
    folder that merely has the right name.
    """

    candidates: tuple[str, ...]
    read: Reader
    accepts: Callable[[Path], bool] = Path.is_dir


@dataclass(frozen=True)
class Source:
    """A dataset as the CIFAR suites use it: its layouts, tried in order, and how to get it."""

    name: str
    description: str
    size: int  # images used as an OOD set (whole dataset for the ID sets)
    layouts: tuple[Layout, ...]
    how_to_get: str

    @property
    def candidates(self) -> tuple[str, ...]:
        return tuple(c for layout in self.layouts for c in layout.candidates)

    def find(self, roots: Sequence[Path]) -> tuple[Path, Layout] | None:
        """The first accepted candidate; earlier roots win, so --data-dir overrides the rest."""
        for root in roots:
            for layout in self.layouts:
                for c in layout.candidates:
                    if layout.accepts(root / c):
                        return root / c, layout
        return None

    def locate(self, roots: Sequence[Path]) -> Path | None:
        found = self.find(roots)
        return found[0] if found else None

    def load(self, roots: Sequence[Path]) -> ImageSet | None:
        """The OOD images (labels -1), or None when the dataset is not on disk."""
        found = self.find(roots)
        return ImageSet(self.name, found[1].read(found[0])) if found else None

    def missing_error(self, roots: Sequence[Path]) -> UserError:
        return missing_data_error(self.description, roots, self.candidates, self.how_to_get)

    def info(self) -> DatasetInfo:
        return DatasetInfo(self.name, self.description, self.size, self.locate, self.how_to_get)


# --------------------------------------------------------------------------- readers


def _read_folder(path: Path, limit: int | None = None) -> torch.Tensor:
    return load_image_folder(path, SIZE, CHANNELS, limit=limit, seed=SUBSET_SEED)


def _read_cifar_test(path: Path) -> torch.Tensor:
    return torch.from_numpy(read_cifar_split(path, "test")[0])


def _is_cifar(path: Path) -> bool:
    return cifar_layout(path) is not None


def _read_svhn(path: Path) -> torch.Tensor:
    return torch.from_numpy(read_svhn_mat(path)[0])


MNIST_IMAGES = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")


def _is_mnist(path: Path) -> bool:
    return all(find_idx(path, stem) for stem in MNIST_IMAGES)


def _read_mnist(path: Path) -> torch.Tensor:
    """All 70,000 MNIST digits (train + test), as OpenOOD uses them, as 32x32 RGB."""
    digits = np.concatenate([read_idx(find_idx(path, stem)) for stem in MNIST_IMAGES])
    return to_format(digits, SIZE, CHANNELS)


TIN_FOLDERS = {"test": "val", "val": "test"}  # role in a suite -> TinyImageNet sub-folder


def _read_tin(path: Path, role: str) -> torch.Tensor:
    """TinyImageNet images for the OOD ``"test"`` or ``"val"`` role, never overlapping."""
    if all((path / sub).is_dir() for sub in TIN_FOLDERS.values()):
        return _read_folder(path / TIN_FOLDERS[role])
    images = _read_folder(path)
    order = np.random.default_rng(SUBSET_SEED).permutation(len(images))
    half = len(images) // 2
    part = order[half:] if role == "test" else order[:half]
    return images[torch.from_numpy(np.sort(part))]


# --------------------------------------------------------------------------- datasets


def _nested(parents: Sequence[str], leaves: Sequence[str]) -> tuple[str, ...]:
    """``leaf`` and ``parent/leaf`` for each leaf: archives are unpacked at either depth."""
    return tuple(
        f"{parent}{leaf}" for parent in ("", *(f"{p}/" for p in parents)) for leaf in leaves
    )


def _cifar(name: str, description: str, leaves: tuple[str, ...], archive: str) -> Source:
    parents = (name, name.upper(), "cifar")
    return Source(
        name,
        description,
        60_000,
        (Layout(_nested(parents, leaves), _read_cifar_test, _is_cifar),),
        f"download {archive} (python or binary version) from the CIFAR site and "
        f"unpack it {WHERE}, giving {leaves[0]}",
    )


def _folder_source(
    name: str,
    description: str,
    size: int,
    candidates: tuple[str, ...],
    how_to_get: str,
    limit: int | None = None,
) -> Source:
    read = functools.partial(_read_folder, limit=limit)
    return Source(name, description, size, (Layout(candidates, read),), how_to_get)


CIFAR10 = _cifar(
    "cifar10",
    "CIFAR-10 (50k train + 10k test, 10 classes)",
    ("cifar-10-batches-py", "cifar-10-batches-bin"),
    "cifar-10-python.tar.gz",
)
CIFAR100 = _cifar(
    "cifar100",
    "CIFAR-100 (50k train + 10k test, 100 classes)",
    ("cifar-100-python", "cifar-100-binary"),
    "cifar-100-python.tar.gz",
)
SVHN = Source(
    "svhn",
    "SVHN test digits (26,032)",
    26_032,
    (
        Layout(_nested(("svhn", "SVHN"), ("test_32x32.mat",)), _read_svhn, Path.is_file),
        Layout(("images_classic/svhn",), _read_folder),
    ),
    f"download test_32x32.mat (SVHN format 2) and put it {WHERE} as svhn/test_32x32.mat",
)
MNIST = Source(
    "mnist",
    "MNIST digits, train + test (70,000), as 32x32 RGB",
    70_000,
    (
        Layout(("mnist", "MNIST/raw", "mnist/MNIST/raw", "MNIST"), _read_mnist, _is_mnist),
        Layout(("images_classic/mnist",), _read_folder),
    ),
    f"put MNIST's IDX files (train-images-idx3-ubyte and t10k-images-idx3-ubyte, plain or .gz) "
    f"{WHERE} in a folder mnist (or MNIST/raw, as torchvision saves them)",
)
TIN_CANDIDATES = ("tiny-imagenet-200", "TinyImageNet", "tinyimagenet", "tin", "images_classic/tin")
TIN_HOW = (
    f"download tiny-imagenet-200.zip and unpack it {WHERE} (its val/ is the OOD test "
    "set, its test/ the OOD validation set)"
)
TIN = Source(
    "tin",
    "TinyImageNet (val/ as OOD test, test/ as OOD validation)",
    10_000,
    (Layout(TIN_CANDIDATES, functools.partial(_read_tin, role="test")),),
    TIN_HOW,
)
TIN_VAL = Source(
    "tin",
    TIN.description,
    10_000,
    (Layout(TIN_CANDIDATES, functools.partial(_read_tin, role="val")),),
    TIN_HOW,
)

# Datasets published as plain folders of images: one row each.
FOLDER_SOURCES = (
    _folder_source(
        "textures",
        "Describable Textures (DTD), 47 texture classes",
        5_640,
        (
            "dtd/images",
            "textures/images",
            "Textures/images",
            "dtd",
            "textures",
            "Textures",
            "texture",
            "images_classic/texture",
        ),
        f"download dtd-r1.0.1.tar.gz (Describable Textures Dataset) and unpack it {WHERE}, "
        "giving dtd/images",
    ),
    _folder_source(
        "places365",
        f"Places365 scenes (a seeded subset of at most {PLACES_LIMIT:,})",
        PLACES_LIMIT,
        ("Places", "places", "places365", "Places365", "images_classic/places365"),
        f"unpack a Places365 OOD subset (MOS's Places.tar.gz or OpenOOD's images_classic/"
        f"places365) {WHERE} as Places or places365",
        limit=PLACES_LIMIT,
    ),
    _folder_source(
        "lsun",
        "LSUN crop (ODIN release)",
        10_000,
        ("LSUN", "LSUN_C", "lsun", "LSUN_crop", "lsun_crop"),
        f"download LSUN.tar.gz (ODIN's LSUN crop) and unpack it {WHERE}, giving LSUN",
    ),
    _folder_source(
        "lsun_resize",
        "LSUN resize (ODIN release)",
        10_000,
        ("LSUN_resize", "LSUN_R", "lsun_resize"),
        f"download LSUN_resize.tar.gz (ODIN release) and unpack it {WHERE}, giving LSUN_resize",
    ),
    _folder_source(
        "isun",
        "iSUN (ODIN release)",
        8_925,
        ("iSUN", "isun"),
        f"download iSUN.tar.gz (ODIN release) and unpack it {WHERE}, giving iSUN",
    ),
    _folder_source(
        "inaturalist",
        "iNaturalist OOD subset (MOS release)",
        10_000,
        ("iNaturalist", "inaturalist", "images_largescale/inaturalist"),
        f"download iNaturalist.tar.gz (MOS's OOD subset) and unpack it {WHERE}, giving iNaturalist",
    ),
    _folder_source(
        "sun",
        "SUN OOD subset (MOS release)",
        10_000,
        ("SUN", "sun"),
        f"download SUN.tar.gz (MOS's OOD subset) and unpack it {WHERE}, giving SUN",
    ),
)

SOURCES: dict[str, Source] = {
    s.name: s for s in (CIFAR10, CIFAR100, SVHN, MNIST, TIN, *FOLDER_SOURCES)
}


# --------------------------------------------------------------------------- ID data


@dataclass(frozen=True)
class IdSpec:
    """An ID dataset with its normalisation and the CIFAR it is paired with as near-OOD."""

    source: Source
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    other: str


ID_SPECS = {
    "cifar10": IdSpec(CIFAR10, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar100"),
    "cifar100": IdSpec(
        CIFAR100, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "cifar10"
    ),
}


@dataclass(frozen=True)
class IdData:
    train: ImageSet
    val: ImageSet
    test: ImageSet
    class_names: tuple[str, ...]


def _id_set(name: str, arrays: tuple[np.ndarray, np.ndarray]) -> ImageSet:
    return ImageSet(name, torch.from_numpy(arrays[0]), torch.from_numpy(arrays[1]))


def load_id(spec: IdSpec, roots: Sequence[Path]) -> IdData:
    """Train (minus the held-out validation images), validation and test splits."""
    folder = spec.source.locate(roots)
    if folder is None:
        raise spec.source.missing_error(roots)
    name = spec.source.name
    train = _id_set(f"{name}-train", read_cifar_split(folder, "train"))
    kept, held = stratified_holdout(train.labels, min(N_VAL, len(train) // 10), SPLIT_SEED)
    return IdData(
        train.subset(kept, f"{name}-train"),
        train.subset(held, f"{name}-val"),
        _id_set(f"{name}-test", read_cifar_split(folder, "test")),
        read_cifar_class_names(folder),
    )


def _benchmark(
    suite: str,
    spec: IdSpec,
    data: IdData,
    ood_test: dict[str, ImageSet],
    ood_val: dict[str, ImageSet],
    groups: dict[str, tuple[str, ...]],
) -> Benchmark:
    return Benchmark(
        name=suite,
        num_classes=spec.num_classes,
        mean=spec.mean,
        std=spec.std,
        id_train=data.train,
        id_val=data.val,
        id_test=data.test,
        ood_test=ood_test,
        ood_val=ood_val,
        class_names=data.class_names,
        ood_groups=groups,
    )


def _tin_val(roots: Sequence[Path], suite: str) -> dict[str, ImageSet]:
    """TinyImageNet validation images, or nothing (with a warning) when TIN is absent."""
    images = TIN_VAL.load(roots)
    if images is None:
        warnings.warn(
            f"{suite}: TinyImageNet not found, so there is no OOD validation set ({TIN_HOW})",
            stacklevel=3,
        )
        return {}
    return {"tin": images}


# --------------------------------------------------------------------------- paper suites

PAPER_OOD = ("inaturalist", "sun", "places365", "textures", "lsun", "svhn")


def load_paper_suite(id_name: str, roots: Sequence[Path]) -> Benchmark:
    """The paper's CIFAR benchmark with whichever of its OOD test sets are on disk."""
    spec = ID_SPECS[id_name]
    data = load_id(spec, roots)
    names = (spec.other, *PAPER_OOD)
    loaded = {name: SOURCES[name].load(roots) for name in names}
    ood = {name: images for name, images in loaded.items() if images is not None}
    if not ood:
        raise UserError(
            f"{id_name}: none of its OOD test sets ({', '.join(names)}) found under "
            f"{', '.join(map(str, roots))}; e.g. {SVHN.how_to_get} ('unleash "
            "datasets' lists where each set is looked for)"
        )
    missing = [name for name in names if name not in ood]
    if missing:
        warnings.warn(
            f"{id_name}: OOD test sets not found and left out: {', '.join(missing)}", stacklevel=2
        )
    return _benchmark(id_name, spec, data, ood, _tin_val(roots, id_name), {})


# --------------------------------------------------------------------------- OpenOOD suites

OPENOOD_NEAR = ("tin",)  # after the other CIFAR
OPENOOD_FAR = ("mnist", "svhn", "textures", "places365")
OPENOOD_LIST_NAMES = {"textures": "texture"}  # our name -> OpenOOD's, where they differ


def _openood_list(roots: Sequence[Path], id_name: str, stem: str) -> torch.Tensor | None:
    """The images named by OpenOOD's ``benchmark_imglist/<id>/<stem>.txt``, if present."""
    for root in roots:
        list_file = root / "benchmark_imglist" / id_name / f"{stem}.txt"
        if list_file.is_file() and (root / "images_classic").is_dir():
            paths = read_imglist(list_file, root / "images_classic")
            return load_images(paths, SIZE, CHANNELS, f"openood-{id_name}-{stem}")
    return None


def _openood_set(roots: Sequence[Path], id_name: str, name: str) -> tuple[ImageSet | None, bool]:
    """An OpenOOD test set from its list or else its folder; True when the list was used."""
    listed = _openood_list(roots, id_name, f"test_{OPENOOD_LIST_NAMES.get(name, name)}")
    if listed is not None:
        return ImageSet(name, listed), True
    return SOURCES[name].load(roots), False


def load_openood_suite(id_name: str, roots: Sequence[Path]) -> Benchmark:
    """OpenOOD v1.5's CIFAR benchmark; every near and far set must be present."""
    suite = f"{id_name}-openood"
    spec = ID_SPECS[id_name]
    data = load_id(spec, roots)
    near, far = (spec.other, *OPENOOD_NEAR), OPENOOD_FAR
    found = {name: _openood_set(roots, id_name, name) for name in (*near, *far)}
    missing = [name for name, (images, _) in found.items() if images is None]
    if missing:
        also = f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""
        raise UserError(f"{suite}: {SOURCES[missing[0]].missing_error(roots)}{also}")
    unlisted = [name for name, (_, listed) in found.items() if not listed]
    if unlisted:
        warnings.warn(
            f"{suite}: OpenOOD's benchmark_imglist/{id_name} lists not found for "
            f"{', '.join(unlisted)}; using whole folders, so set sizes differ from "
            "OpenOOD v1.5 (put its images_classic and benchmark_imglist in a data "
            "root to match)",
            stacklevel=2,
        )
    val = _openood_list(roots, id_name, "val_tin")
    ood_val = {"tin": ImageSet("tin", val)} if val is not None else _tin_val(roots, suite)
    ood_test = {name: images for name, (images, _) in found.items()}
    return _benchmark(suite, spec, data, ood_test, ood_val, {"near": near, "far": far})


# --------------------------------------------------------------------------- registration

for _source in SOURCES.values():
    register_dataset(_source.info())
for _id in ID_SPECS:
    _other = ID_SPECS[_id].other
    register_suite(
        SuiteInfo(
            _id,
            f"{_id.upper()} vs {_other.upper()}, iNaturalist, SUN, Places365, Textures, LSUN, "
            "SVHN (the paper's suite)",
            (_id, _other, *PAPER_OOD, "tin"),
            functools.partial(load_paper_suite, _id),
        )
    )
    register_suite(
        SuiteInfo(
            f"{_id}-openood",
            f"OpenOOD v1.5: {_id.upper()} vs near {_other.upper()}, TIN; far "
            "MNIST, SVHN, Textures, Places365",
            (_id, _other, *OPENOOD_NEAR, *OPENOOD_FAR),
            functools.partial(load_openood_suite, _id),
        )
    )
