"""Datasets and benchmark suites: ``load_benchmark("fmnist")`` and friends."""

from __future__ import annotations

import os
from pathlib import Path

from unleash_ood.data import cifar, fmnist, openood  # noqa: F401  (register datasets and suites)
from unleash_ood.data.base import Benchmark, ImageData, ImageSet, data_roots
from unleash_ood.data.benchmark_file import YAML_SUFFIXES, load_benchmark_file
from unleash_ood.data.registry import DATASETS, SUITES, get_suite
from unleash_ood.data.streaming import ImageFiles
from unleash_ood.errors import UserError


def load_benchmark(name: str, data_dir: str | os.PathLike | None = None) -> Benchmark:
    """Build the named suite from data found under ``data_dir``, ``$UNLEASH_DATA`` or the
    system; a name ending in ``.json``, ``.yaml`` or ``.yml`` is a benchmark file
    (:mod:`benchmark_file`)."""
    if name.endswith((".json", *YAML_SUFFIXES)):
        if not Path(name).is_file():
            raise UserError(f"benchmark file {name} not found")
        return load_benchmark_file(name)
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
    "ImageData",
    "ImageFiles",
    "ImageSet",
    "availability",
    "data_roots",
    "load_benchmark",
    "load_benchmark_file",
]
