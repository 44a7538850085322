"""Datasets and benchmark suites: ``load_benchmark("fmnist")`` and friends."""

from __future__ import annotations

import os

from unleash_ood.data import cifar, fmnist  # noqa: F401  (register their datasets and suites)
from unleash_ood.data.base import Benchmark, ImageSet, data_roots
from unleash_ood.data.registry import DATASETS, SUITES, get_suite


def load_benchmark(name: str, data_dir: str | os.PathLike | None = None) -> Benchmark:
    """Build the named suite from data found under ``data_dir``, ``$UNLEASH_DATA`` or the system."""
    return get_suite(name).load(data_roots(data_dir))


def availability(data_dir: str | os.PathLike | None = None) -> dict[str, str | None]:
    """For every registered dataset, where it was found (None when it is not available)."""
    roots = data_roots(data_dir)
    return {
        name: (str(p) if (p := info.locate(roots)) else None) for name, info in DATASETS.items()
    }


__all__ = [
    "DATASETS",
    "SUITES",
    "Benchmark",
    "ImageSet",
    "availability",
    "data_roots",
    "load_benchmark",
]
