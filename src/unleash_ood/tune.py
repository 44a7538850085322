"""Hyperparameters of post-hoc scorers chosen on validation data only.

For each scorer with a grid below, every combination is fitted on the ID training split (or
the scorer's ``fit_split``) and scored on the ID validation split against the OOD validation
sets; the combination with the highest mean validation AUROC wins (ties: the first in grid
order). The search runs on a view of the benchmark that holds no test set at all, so no test
image can influence a choice.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from unleash_ood.data.base import Benchmark
from unleash_ood.errors import UserError
from unleash_ood.scores import Scorer, make_scorer

if TYPE_CHECKING:
    from unleash_ood.evaluate import Evaluator

Grid = dict[str, tuple[object, ...]]

# The documented search per scorer; values are the authors' or OpenOOD v1.5's sweeps where
# they publish one, trimmed to a few points. ``dim`` grids are fractions of the feature size.
GRIDS: dict[str, Grid] = {
    "odin": {"temperature": (1.0, 10.0, 100.0, 1000.0), "epsilon": (0.0, 0.0014, 0.0028)},
    "gen": {"gamma": (0.01, 0.1, 0.5)},
    "knn": {"k": (10, 50, 100, 200, 500)},
    "react": {"percentile": (85.0, 90.0, 95.0, 99.0)},
    "ash_s": {"percentile": (65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0)},
    "ash_b": {"percentile": (65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0)},
    "ash_p": {"percentile": (65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0)},
    "scale": {"percentile": (65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0)},
    "dice": {"sparsity": (50.0, 70.0, 90.0)},
    "nci": {"alpha": (0.0001, 0.001, 0.01, 0.1)},
    "nnguide": {"k": (10, 50, 100)},
    "relation": {"power": (1, 2, 4, 6, 8)},
    "openmax": {"tail": (5, 10, 20, 50), "alpha": (1, 2, 3)},
    "vra": {"low": (40.0, 50.0, 60.0), "high": (85.0, 90.0, 95.0, 99.0)},
    "mode": {"k": (1, 5, 10, 50)},
    "forte": {"k": (3, 5, 10)},
}
# ViM and its residual: the principal subspace as a fraction of the feature dimension.
DIM_FRACTIONS = {"vim": (0.25, 0.5, 0.75), "residual": (0.25, 0.5, 0.75)}


def validation_view(benchmark: Benchmark) -> Benchmark:
    """The benchmark without its ID and OOD test sets."""
    if not benchmark.ood_val:
        raise UserError(
            f"benchmark {benchmark.name!r} has no OOD validation sets, so nothing can be tuned; "
            f"run without --tune"
        )
    return dataclasses.replace(benchmark, id_test=None, ood_test={}, ood_groups={})


def parse_grids(spec: str) -> dict[str, Grid]:
    """Grids from the command line: ``"knn:k=10/50/100,react:percentile=90/95"``."""
    grids: dict[str, Grid] = {}
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        name, *assignments = (part.strip() for part in entry.split(":"))
        grid = {}
        for assignment in assignments:
            key, sep, values = assignment.partition("=")
            if not sep or not values:
                raise UserError(f"bad grid {assignment!r} in {entry!r}: write e.g. knn:k=10/50/100")
            grid[key.strip()] = tuple(_number(v.strip(), entry) for v in values.split("/"))
        grids[name] = grid
    return grids


def _number(text: str, entry: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"grid values must be numbers; got {text!r} in {entry!r}") from None


def check_grid(name: str, grid: Grid) -> None:
    """Refuse unknown parameters and out-of-range values before any work."""
    for param, values in grid.items():
        for value in values:
            make_scorer(name, **{param: value})


def grid_for(scorer: Scorer, feature_dim: int, grids: dict[str, Grid] | None = None) -> Grid:
    """The grid searched for ``scorer``: the user's if given, else the documented default."""
    if grids and scorer.name in grids:
        return grids[scorer.name]
    if scorer.name in DIM_FRACTIONS:
        return {"dim": tuple(max(1, round(f * feature_dim)) for f in DIM_FRACTIONS[scorer.name])}
    return GRIDS.get(scorer.name, {})


def tune_scorers(
    evaluator: Evaluator, scorers: Sequence[Scorer], grids: dict[str, Grid] | None = None
) -> tuple[list[Scorer], dict[str, dict]]:
    """Each scorer with its best grid point on validation data, and what was chosen.

    ``evaluator`` must hold a :func:`validation_view` of the benchmark. Returns the tuned
    (unfitted) scorers in order, and per tuned scorer its chosen ``params``, the
    ``val_auroc`` they reached and the ``grid`` searched.
    """
    if evaluator.benchmark.ood_test or evaluator.benchmark.id_test is not None:
        raise ValueError("tune needs an evaluator over validation_view(benchmark)")
    for name, grid in (grids or {}).items():
        check_grid(name, grid)
    feature_dim = evaluator.model.head.in_features
    tuned, report = [], {}
    for scorer in scorers:
        grid = grid_for(scorer, feature_dim, grids)
        if not grid:
            tuned.append(scorer)
            continue
        best, best_auroc = None, -1.0
        for combo in itertools.product(*grid.values()):
            candidate = scorer.with_params(**dict(zip(grid, combo, strict=True)))
            evaluator.scorers = [candidate]
            auroc = evaluator.run(("val",)).row(scorer.name, split="val")["auroc"]
            if auroc > best_auroc:
                best, best_auroc = candidate, auroc
        tuned.append(best.with_params())
        report[scorer.name] = {
            "params": {p: getattr(best, p) for p in grid},
            "val_auroc": best_auroc,
            "grid": {p: list(v) for p, v in grid.items()},
        }
    return tuned, report
