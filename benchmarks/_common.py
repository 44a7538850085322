"""Helpers shared by the benchmark scripts: a model to measure and a fair clock."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unleash_ood.checkpoint import load_checkpoint, read_sidecar
from unleash_ood.data.base import Benchmark
from unleash_ood.evaluate import CHANCE
from unleash_ood.models import Classifier, create_model
from unleash_ood.report import HEADERS
from unleash_ood.tables import ResultsTable

METRICS = ("auroc", "fpr95_id", "fpr95_ood")


def benchmark_model(bench: Benchmark, checkpoint: str | None) -> Classifier:
    """The given checkpoint, else a freshly initialised default model (timing barely depends
    on the weights)."""
    if checkpoint:
        return load_checkpoint(Path(checkpoint), "cpu", bench.num_classes, bench.image_shape)[0]
    torch.manual_seed(0)
    c = bench.image_shape[0]
    return create_model("cnn", bench.num_classes, c, mean=bench.mean, std=bench.std)


def run_seed(run: Path) -> int:
    """The pretraining seed of a run, from its last checkpoint; fine-tunes of the run reuse it,
    so a run gives the same models whichever other runs it is benchmarked with."""
    return int(read_sidecar(run / "checkpoints" / "last")["recipe"]["seed"])


def per_run_summaries(per_run: dict[str, dict[str, dict]], scorers: list[str]) -> dict:
    """``{run: {model: {scorer: summary}}}``: what the tables average, kept per run so that
    tables over other sets of runs can be built without redoing them."""
    return {
        run: {m: {s: summarise(ev, s) for s in scorers} for m, ev in models.items()}
        for run, models in per_run.items()
    }


@dataclass(frozen=True)
class Usage:
    """What one call cost: wall seconds, CPU seconds in user and kernel mode (all threads of
    this process), and minor page faults (fresh pages the kernel had to map and zero)."""

    wall: float
    user: float
    sys: float
    faults: int


def _usage_of(fn: Callable[[], object]) -> Usage:
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return Usage(
        wall,
        after.ru_utime - before.ru_utime,
        after.ru_stime - before.ru_stime,
        after.ru_minflt - before.ru_minflt,
    )


def best_usage(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, Usage]:
    """Each function's cheapest round (by wall time) over ``repeats`` rounds, the functions
    interleaved so that a slow spell of a shared machine hits all of them alike."""
    best: dict[str, Usage] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            u = _usage_of(fn)
            if name not in best or u.wall < best[name].wall:
                best[name] = u
    return best


def best_of(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Minimum wall time of each function over ``repeats`` interleaved rounds."""
    return {name: u.wall for name, u in best_usage(fns, repeats).items()}


def stepper(model, objective, batches) -> Callable[[], None]:
    """Training steps over ``batches`` as the trainer takes them, without its bookkeeping."""
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9, weight_decay=1e-4
    )

    def run() -> None:
        model.train()
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            loss, _ = objective(model, x, y)
            loss.backward()
            opt.step()

    return run


def summarise(
    evaluation: dict, scorer: str, exclude: Sequence[str] | None = None
) -> dict[str, float]:
    """ID test accuracy and the mean-over-OOD-test-sets metrics (x100) of one evaluation, for
    one scorer or averaged over every scorer evaluated (``all``) but those in ``exclude``;
    without ``exclude``, but those below chance (mean AUROC < 0.5) in this evaluation, which
    the average would hide. Pass ``exclude`` (e.g. the start model's below-chance scorers) to
    average the same scorers over every model of a comparison."""
    rows = [
        r
        for r in evaluation["rows"]
        if r["split"] == "test"
        and r["dataset"] == "mean"
        and (
            r["scorer"] == scorer
            or (
                scorer == "all"
                and (r["auroc"] >= CHANCE if exclude is None else r["scorer"] not in exclude)
            )
        )
    ]
    out = {m: 100 * float(np.mean([r[m] for r in rows])) for m in METRICS}
    return {"acc": 100 * evaluation["accuracy"]["id_test"], **out}


SUMMARY_COLUMNS = {"acc": "ID acc", **{m: HEADERS[m] for m in METRICS}}


def mean_std_table(models: dict[str, list[dict]], scorer: str) -> str:
    """One row per model: mean ± std over runs of accuracy and the headline metrics."""
    table = ResultsTable(
        [{"model": name, **summarise(e, scorer)} for name, evs in models.items() for e in evs]
    )
    means = table.mean(by=["model"], values=list(SUMMARY_COLUMNS))
    return means.to_markdown({"model": "model", **SUMMARY_COLUMNS})
