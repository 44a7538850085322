"""The embedded default benchmark ``fmnist``: Fashion-MNIST vs OOD sets that need no download.

ID data comes from the four original IDX files (Debian's ``dataset-fashion-mnist`` installs them
in ``/usr/share/datasets/fashion-mnist``); the OOD sets are built by :mod:`bundled`.
Noise is reported per set but kept out of the headline mean: its AUROC swings by tens of
points between neighbouring epochs of one training run, which would drown real differences.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from unleash_ood.data import bundled
from unleash_ood.data.base import (
    Benchmark,
    ImageSet,
    cache_dir,
    missing_data_error,
    stratified_holdout,
)
from unleash_ood.data.formats import find_idx, read_idx_pair
from unleash_ood.data.registry import DatasetInfo, SuiteInfo, register_dataset, register_suite

CANDIDATES = ("fashion-mnist", "FashionMNIST/raw", "fashion_mnist", "FashionMNIST")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MEAN, STD = (0.2860,), (0.3530,)
NUM_CLASSES = 10
VAL_FRACTION = 1 / 12  # 5,000 of the 60,000 training images
SPLIT_SEED = 0
HOW_TO_GET = (
    "install it with 'apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or put "
    "the four IDX files under --data-dir / $UNLEASH_DATA in a folder 'fashion-mnist'"
)


def locate(roots: Sequence[Path]) -> Path | None:
    """The first candidate folder that holds all four IDX files."""
    for root in roots:
        for c in CANDIDATES:
            folder = root / c
            if all(find_idx(folder, s) for pair in FILES.values() for s in pair):
                return folder
    return None


def _download() -> Path | None:
    """torchvision's download, tried only when nothing is on disk and the network allows."""
    if os.environ.get("UNLEASH_OFFLINE", "") not in ("", "0"):
        return None
    try:
        from torchvision.datasets import FashionMNIST

        root = cache_dir() / "torchvision"
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception as e:  # any network or mirror failure means: not available
        warnings.warn(
            f"Fashion-MNIST download failed ({type(e).__name__}); using local files only",
            stacklevel=2,
        )
        return None
    return locate([root])


def load_split(folder: Path, split: str) -> ImageSet:
    images_file, labels_file = (find_idx(folder, s) for s in FILES[split])
    images, labels = read_idx_pair(images_file, labels_file, NUM_CLASSES)
    return ImageSet(
        f"fmnist-{split}", torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels)
    )


def _ood(sets: dict[str, bundled.BundledSet]) -> dict[str, ImageSet]:
    return {name: ImageSet(name, torch.from_numpy(s.load())[:, None]) for name, s in sets.items()}


def load(roots: Sequence[Path]) -> Benchmark:
    folder = locate(roots) or _download()
    if folder is None:
        raise missing_data_error("Fashion-MNIST", roots, CANDIDATES, HOW_TO_GET)
    train = load_split(folder, "train")
    kept, held = stratified_holdout(train.labels, round(len(train) * VAL_FRACTION), SPLIT_SEED)
    return Benchmark(
        name="fmnist",
        num_classes=NUM_CLASSES,
        mean=MEAN,
        std=STD,
        id_train=train.subset(kept, "fmnist-train"),
        id_val=train.subset(held, "fmnist-val"),
        id_test=load_split(folder, "test"),
        ood_test=_ood(bundled.TEST_SETS),
        ood_val=_ood(bundled.VAL_SETS),
        class_names=CLASSES,
        excluded_from_mean=("noise",),
    )


register_dataset(
    DatasetInfo(
        "fashion-mnist",
        "Fashion-MNIST, 60k train + 10k test, 28x28 grey",
        70000,
        locate,
        HOW_TO_GET,
    )
)
for _s in [*bundled.TEST_SETS.values(), *bundled.VAL_SETS.values(), bundled.AUX_SET]:
    register_dataset(
        DatasetInfo(
            f"bundled-{_s.split}/{_s.name}",
            _s.description,
            _s.size,
            _s.locate,
            bundled.INSTALL_HINT,
        )
    )
register_suite(
    SuiteInfo(
        "fmnist",
        "Fashion-MNIST vs MNIST, letters, textures, photos, 8x8 digits, noise (offline)",
        (
            "fashion-mnist",
            *(f"bundled-test/{n}" for n in bundled.TEST_SETS),
            *(f"bundled-val/{n}" for n in bundled.VAL_SETS),
        ),
        load,
    )
)
