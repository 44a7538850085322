"""OpenOOD v1.5's ImageNet-1K suite, read from its own layout and streamed from disk.

Zhang et al., "OpenOOD v1.5: Enhanced Benchmark for Out-of-Distribution Detection" (DMLR
2024): ImageNet-1K as ID (1.28M training, 45k test images), near-OOD SSB-hard and NINCO,
far-OOD iNaturalist, Textures and OpenImage-O, and OpenImage-O's validation part for choosing
hyperparameters. The data root (``--data-dir``) holds what OpenOOD's download script unpacks::

    benchmark_imglist/imagenet/{train,val,test}_imagenet.txt
    benchmark_imglist/imagenet/test_{ssb_hard,ninco,inaturalist,textures,openimage_o}.txt
    benchmark_imglist/imagenet/val_openimage_o.txt
    images_largescale/...        (the paths the lists name)

Images are read as OpenOOD tests them: short side to 256, centre 224 x 224 crop, RGB.
``imagenet`` is a second name of the same suite.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from unleash_ood.data.base import Benchmark, missing_data_error
from unleash_ood.data.benchmark_file import benchmark_from_spec
from unleash_ood.data.registry import DatasetInfo, SuiteInfo, register_dataset, register_suite

LISTS = "benchmark_imglist/imagenet"
IMAGES = "images_largescale"
NEAR = ("ssb_hard", "ninco")
FAR = ("inaturalist", "textures", "openimage_o")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
HOW_TO_GET = (
    "download OpenOOD v1.5's ImageNet-1K benchmark (its scripts/download/download.py) and give "
    "the folder holding benchmark_imglist/ and images_largescale/ as --data-dir"
)


def _list(name: str) -> dict[str, str]:
    return {"imglist": f"{LISTS}/{name}.txt", "root": IMAGES}


SPEC = {
    "name": "imagenet-openood",
    "resolution": 224,
    "pre_size": 256,
    "channels": 3,
    "classes": 1000,
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "id": {split: _list(f"{split}_imagenet") for split in ("train", "val", "test")},
    "ood_val": {"openimage_o": _list("val_openimage_o")},
    "ood_test": {name: _list(f"test_{name}") for name in (*NEAR, *FAR)},
    "groups": {"near": list(NEAR), "far": list(FAR)},
}


def locate(roots: Sequence[Path]) -> Path | None:
    """The first root holding OpenOOD's ImageNet test list and image folder."""
    for root in roots:
        if (root / LISTS / "test_imagenet.txt").is_file() and (root / IMAGES).is_dir():
            return root
    return None


def load(roots: Sequence[Path], name: str = "imagenet-openood") -> Benchmark:
    root = locate(roots)
    if root is None:
        raise missing_data_error("OpenOOD v1.5 ImageNet-1K", roots, (LISTS,), HOW_TO_GET)
    return benchmark_from_spec({**SPEC, "name": name}, root, f"OpenOOD layout in {root}")


register_dataset(
    DatasetInfo(
        "openood-imagenet",
        "OpenOOD v1.5 ImageNet-1K image lists and images (streamed, 224x224)",
        1_281_167 + 45_000,
        locate,
        HOW_TO_GET,
    )
)
for suite in ("imagenet-openood", "imagenet"):
    register_suite(
        SuiteInfo(
            suite,
            "ImageNet-1K vs SSB-hard, NINCO (near); iNaturalist, Textures, OpenImage-O (far)",
            ("openood-imagenet",),
            lambda roots, suite=suite: load(roots, suite),
        )
    )
