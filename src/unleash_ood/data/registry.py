"""Names of every dataset and benchmark suite, with where each is looked for.

Modules that define datasets (``fmnist``, ``cifar``, ...) register them here on import, so
``unleash datasets`` can list everything with its size and whether it is available, without
loading any of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from unleash_ood.data.base import Benchmark
from unleash_ood.errors import UserError


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset the library knows: ``locate(roots)`` says where it is (None if absent)."""

    name: str
    description: str
    size: int
    locate: Callable[[Sequence[Path]], Path | None]
    how_to_get: str


@dataclass(frozen=True)
class SuiteInfo:
    """A named benchmark: ID data plus OOD validation / test sets, built by ``load(roots)``."""

    name: str
    description: str
    datasets: tuple[str, ...]  # every dataset the suite needs, for availability
    load: Callable[[Sequence[Path]], Benchmark]


DATASETS: dict[str, DatasetInfo] = {}
SUITES: dict[str, SuiteInfo] = {}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    DATASETS[info.name] = info
    return info


def register_suite(info: SuiteInfo) -> SuiteInfo:
    SUITES[info.name] = info
    return info


def get_suite(name: str) -> SuiteInfo:
    if name not in SUITES:
        raise UserError(f"unknown benchmark {name!r}; choose one of: {', '.join(sorted(SUITES))}")
    return SUITES[name]
