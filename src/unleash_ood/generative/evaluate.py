"""Scoring a trained detector on a benchmark: the same :class:`Evaluation` (metrics per OOD
set, mean and group rows, raw scores for histograms) that the classifier evaluator returns, so
the report writers and plots serve both. There is no ID accuracy to report."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from unleash_ood.data.base import Benchmark, ImageSet
from unleash_ood.device import to_device
from unleash_ood.errors import UserError
from unleash_ood.evaluate import SPLITS, Evaluation
from unleash_ood.generative.base import DetectorScore, GenerativeModel


def score_set(
    score: DetectorScore,
    model: GenerativeModel,
    data: ImageSet,
    device: torch.device,
    batch_size: int = 256,
    progress: bool = False,
) -> np.ndarray:
    """``score`` of every image of ``data``, float64 on the CPU."""
    if len(data) == 0:
        raise UserError(f"dataset {data.name!r} is empty; nothing to score")
    model.eval()
    parts = [
        score.score_batch(model, to_device(x, device)).double().cpu()
        for x, _ in tqdm(
            data.batches(batch_size),
            total=-(-len(data) // batch_size),
            desc=f"{score.name} {data.name}",
            leave=False,
            disable=not progress,
        )
    ]
    return torch.cat(parts).numpy()


def evaluate_detector(
    model: GenerativeModel,
    benchmark: Benchmark,
    scores: Sequence[DetectorScore],
    splits: Sequence[str] = ("test",),
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: bool = False,
) -> Evaluation:
    """Every score on the ID test (or validation) split and each OOD set of ``splits``;
    scores that need ID statistics are fit on the ID training split first."""
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise UserError(f"unknown split {bad[0]!r}; choose from {', '.join(SPLITS)}")
    device = torch.device(device)
    for s in scores:
        s.check(model)
    for s in scores:
        if s.requires_fit:
            s.fit(model, benchmark.id_train, device, progress)
    id_sets = {"test": benchmark.id_test, "val": benchmark.id_val}
    ood_sets = {"test": benchmark.ood_test, "val": benchmark.ood_val}
    result = Evaluation(benchmark.name, {})
    for split in splits:
        if not ood_sets[split]:
            continue
        for s in scores:
            sets = {"id": id_sets[split], **ood_sets[split]}
            values = {
                name: score_set(s, model, data, device, batch_size, progress)
                for name, data in sets.items()
            }
            result.add_scores(split, s.name, values, benchmark)
    return result
