"""Helpers shared by the benchmark scripts: a model to measure and a fair clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from unleash_ood.checkpoint import load_checkpoint
from unleash_ood.data.base import Benchmark
from unleash_ood.models import Classifier, create_model


def benchmark_model(bench: Benchmark, checkpoint: str | None) -> Classifier:
    """The given checkpoint, else a freshly initialised default model (timing barely depends
    on the weights)."""
    if checkpoint:
        return load_checkpoint(Path(checkpoint), "cpu", bench.num_classes, bench.image_shape)[0]
    torch.manual_seed(0)
    c = bench.image_shape[0]
    return create_model("cnn", bench.num_classes, c, mean=bench.mean, std=bench.std)


def best_of(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Minimum wall time of each function over ``repeats`` rounds, the functions interleaved
    so that a slow spell of a shared machine hits all of them alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best
