"""One evaluator: run the model once per dataset, apply every scorer, tabulate the metrics.

Non-gradient scorers all work from the same :class:`Outputs` (penultimate features and logits),
so each dataset costs one forward pass however many of them are asked for. Only gradient
scorers (ODIN) go back to the model, batch by batch.

Under ``torchrun`` (any process group joined before the evaluator is made) each process
forwards one contiguous shard of every dataset and the shards are gathered in order on every
process, so all of them hold the same outputs and compute the same metrics as one process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from unleash_ood.data.base import Benchmark, ImageData
from unleash_ood.data.noise import stratified_subset
from unleash_ood.device import (
    Dist,
    autocast_dtype,
    current_dist,
    prepare_model,
    resolve_device,
    to_device,
)
from unleash_ood.errors import UserError
from unleash_ood.heap import release_freed_memory
from unleash_ood.metrics import METRIC_NAMES, accuracy, ood_metrics
from unleash_ood.models import Classifier
from unleash_ood.models.adapter import check_split
from unleash_ood.outputs import Outputs, progress_batches
from unleash_ood.outputs import forward_outputs as forward_outputs
from unleash_ood.scores import Scorer, as_scorers
from unleash_ood.tables import ResultsTable
from unleash_ood.tune import Grid, tune_scorers, validation_view

SPLITS = ("val", "test")
# Mean AUROC below this marks a scorer as worse than chance in rankings; such scorers are kept
# out of any average over scorers, where they would hide behind the others.
CHANCE = 0.5


def model_scores(
    scorer: Scorer,
    model: Classifier,
    data: ImageData,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    progress: bool = False,
    workers: int = 0,
) -> torch.Tensor:
    """Scores of a gradient scorer (``needs_model``), batch by batch, in the same
    channels-last batches as :func:`forward_outputs`."""
    device = torch.device(device)
    desc = f"{scorer.name} {data.name}"
    parts = [
        scorer.score_batch(model, to_device(x, device))
        for x, _ in progress_batches(data, batch_size, desc, progress, workers, device)
    ]
    return torch.cat(parts)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, end)`` of process ``rank``'s contiguous shard of ``n`` samples; shard sizes
    differ by at most one, the larger ones first."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def gather_rows(part: torch.Tensor, n: int, ctx: Dist, device: torch.device) -> torch.Tensor:
    """Every process's shard (rows, as :func:`shard_bounds` cuts them) concatenated in rank
    order, on the CPU of every process. Shards are padded to one size for ``all_gather``;
    NCCL sends them from ``device``, gloo from the CPU."""
    sizes = [b - a for a, b in (shard_bounds(n, r, ctx.world) for r in range(ctx.world))]
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros((max(sizes), *part.shape[1:]), dtype=part.dtype, device=where)
    padded[: len(part)] = part
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:k] for g, k in zip(gathered, sizes, strict=True)]).cpu()


def check_fits(model: Classifier, benchmark: Benchmark) -> None:
    """Refuse a model whose head or input channels do not match the benchmark's data (a
    1000-class head on 10 classes, 3-channel statistics broadcast over grey images) before
    any work, instead of metrics computed from the wrong outputs."""
    check_split(model)
    classes = model.head.out_features
    if classes != benchmark.num_classes:
        raise UserError(
            f"the model predicts {classes} classes but {benchmark.name} has "
            f"{benchmark.num_classes}; use a model of this benchmark's classes (for your own "
            "model, a class map: unleash_ood.load_model(..., class_map=...))"
        )
    channels = benchmark.image_shape[0]
    takes = getattr(model, "in_channels", channels)  # a Classifier's; any module with a head
    if takes != channels:
        grey = (
            "wrap it as unleash_ood.models.ExternalModel(model, head, "
            "Preprocess(gray_to_rgb=True), mean, std) to repeat the grey channel, or use a "
            "model made for them"
        )
        raise UserError(
            f"the model takes {takes}-channel images but {benchmark.name}'s have "
            f"{channels}; {grey if channels == 1 and takes == 3 else 'use a model made for them'}"
        )


def applicable_scorers(model: Classifier, scorers: list[Scorer]) -> list[Scorer]:
    """``scorers`` ("all" of them) less those that read a feature map ``model`` does not
    expose, with a warning that names them; a scorer asked for by name is refused instead
    (:func:`check_feature_maps`)."""
    if model.exposes_map():
        return scorers
    left_out = [s.name for s in scorers if s.map_summaries]
    if left_out:
        warnings.warn(
            f"scores 'all' leaves out {', '.join(left_out)}: they read the last feature map "
            f"before pooling, which {type(model).__name__} does not expose",
            stacklevel=3,
        )
    return [s for s in scorers if not s.map_summaries]


def fittable_scorers(scorers: list[Scorer], sizes: dict[str, int], every: bool) -> list[Scorer]:
    """``scorers`` less those that cannot be fit on the ID data at hand (``sizes``: samples per
    fit split; :meth:`~unleash_ood.scores.base.Scorer.fit_problem`), checked before any
    forward pass: left out of "all" (``every``) with a warning that names them, refused when
    asked for by name."""
    problems = {
        s.name: problem
        for s in scorers
        if s.requires_fit and (problem := s.fit_problem(sizes[s.fit_split])) is not None
    }
    if problems and not every:
        name, problem = next(iter(problems.items()))
        raise UserError(f"{name}: {problem}")
    if problems:
        reasons = ", ".join(f"{name} ({problem})" for name, problem in problems.items())
        warnings.warn(f"scores 'all' leaves out {reasons}", stacklevel=3)
    return [s for s in scorers if s.name not in problems]


def check_feature_maps(model: Classifier, scorers: Sequence[Scorer]) -> None:
    """Refuse, before any work, scorers that read a feature map the model does not expose."""
    for scorer in scorers:
        if scorer.map_summaries and not model.exposes_map():
            raise UserError(
                f"{scorer.name} needs the model's last feature map before pooling, but "
                f"{type(model).__name__} does not expose one; drop {scorer.name} from the scorers"
            )


def model_fingerprint(model: torch.nn.Module) -> str:
    """A digest of the weights, so cached outputs are never reused for another model."""
    h = hashlib.blake2b(digest_size=12)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# The arrays of a cached ``Outputs`` and the dtypes each may have on disk.
CACHE_DTYPES = {"features": ("float32", "float16"), "logits": ("float32",), "labels": ("int64",)}


class OutputCache:
    """Outputs stored as ``.npy`` files under ``root/<model fingerprint>/<key>/``, read back
    memory-mapped: a cached set costs page cache, not process memory, until a scorer reads it.
    The evaluator's keys name the split and the data's fingerprint. With ``fp16`` the features
    are stored in float16 (half the disk; the key says so, and they come back as float32).

    Files are loaded with ``allow_pickle=False`` and checked for shape and type; a file that
    does not fit is ignored and rewritten. They are mapped copy-on-write (``mmap_mode="c"``):
    a scorer writing into its input can never change the cache, nor crash on a read-only map.
    """

    def __init__(self, root: str | Path, model: torch.nn.Module, fp16: bool = False):
        self.dir = Path(root) / model_fingerprint(model)
        self.fp16 = fp16

    def _folder(self, key: str) -> Path:
        return self.dir / (f"{key}-fp16" if self.fp16 else key)

    def get(self, key: str) -> Outputs | None:
        folder = self._folder(key)
        try:
            arrays = {
                name: np.load(folder / f"{name}.npy", mmap_mode="c", allow_pickle=False)
                for name in CACHE_DTYPES
            }
        except (OSError, ValueError):
            return None  # absent, truncated or not an array: computed again
        if not self._consistent(arrays):
            return None
        features = arrays.pop("features")
        if features.dtype != np.float32:
            features = features.astype(np.float32)
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
        summaries = self._summaries(folder, len(tensors["labels"]))
        return Outputs(torch.from_numpy(features), tensors["logits"], tensors["labels"], summaries)

    @staticmethod
    def _summaries(folder: Path, n: int) -> dict[str, torch.Tensor]:
        """The feature-map summaries stored beside the outputs (``summary-<name>.npy``); one
        that does not fit is left out, so a scorer that needs it has it computed again."""
        kept = {}
        for path in sorted(folder.glob("summary-*.npy")):
            try:
                array = np.load(path, mmap_mode="c", allow_pickle=False)
            except (OSError, ValueError):
                continue
            if array.dtype == np.float32 and array.ndim >= 2 and len(array) == n:
                kept[path.stem.removeprefix("summary-")] = torch.from_numpy(array)
        return kept

    def _consistent(self, arrays: dict[str, np.ndarray]) -> bool:
        n = len(arrays["labels"])
        return (
            all(arrays[k].dtype.name in ok for k, ok in CACHE_DTYPES.items())
            and arrays["features"].ndim == arrays["logits"].ndim == 2
            and arrays["labels"].ndim == 1
            and len(arrays["features"]) == len(arrays["logits"]) == n
        )

    def put(self, key: str, out: Outputs) -> None:
        """Write the arrays (and any map summaries) into a temporary folder, then rename it
        into place."""
        folder = self._folder(key)
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        features = out.features.numpy()
        arrays = {
            "features": features.astype(np.float16) if self.fp16 else features,
            "logits": out.logits.numpy(),
            "labels": out.labels.numpy(),
        }
        arrays.update({f"summary-{k}": v.numpy() for k, v in out.summaries.items()})
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)


@dataclass
class Evaluation:
    """Every metric of every scorer on every OOD set, plus ID accuracy.

    ``rows`` is a tidy list of dicts with keys split, scorer, dataset and each metric; the
    pseudo-dataset ``mean`` averages the sets not excluded by the benchmark, and group names
    (e.g. OpenOOD's ``near``/``far``) average their members. ``scores`` keeps the raw scores
    per split, scorer and dataset (``id`` for the ID set) for plots. ``tuning`` holds, per
    scorer tuned on validation data, the chosen ``params``, their ``val_auroc`` and the
    ``grid`` searched.
    """

    benchmark: str
    accuracy: dict[str, float]
    rows: list[dict] = field(default_factory=list)
    scores: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    tuning: dict[str, dict] = field(default_factory=dict)

    def row(self, scorer: str, dataset: str = "mean", split: str = "test") -> dict:
        for r in self.rows:
            if (r["split"], r["scorer"], r["dataset"]) == (split, scorer, dataset):
                return r
        raise KeyError((split, scorer, dataset))

    def scorers(self) -> list[str]:
        return list(dict.fromkeys(r["scorer"] for r in self.rows))

    def ranking(self, split: str = "test") -> list[dict]:
        """The ``mean`` rows of ``split``, best mean AUROC first, each with ``below_chance``."""
        rows = [r for r in self.rows if r["split"] == split and r["dataset"] == "mean"]
        ranked = sorted(rows, key=lambda r: -r["auroc"])
        return [{**r, "below_chance": r["auroc"] < CHANCE} for r in ranked]

    def sound_scorers(self, split: str = "test") -> list[str]:
        """Scorers whose mean AUROC is not below chance: those an average over scorers takes."""
        return [r["scorer"] for r in self.ranking(split) if not r["below_chance"]]

    def table(self) -> ResultsTable:
        """Every metric row (split, scorer, dataset, metrics) as a :class:`ResultsTable`."""
        return ResultsTable([dict(r) for r in self.rows])

    def to_dict(self) -> dict:
        out = {"benchmark": self.benchmark, "accuracy": self.accuracy, "rows": self.rows}
        return {**out, "tuning": self.tuning} if self.tuning else out

    def add_scores(
        self, split: str, scorer: str, scores: dict[str, np.ndarray], benchmark: Benchmark
    ) -> None:
        """Metrics of one scorer's ``scores`` (``id`` plus one entry per OOD set of ``split``):
        a row per set, then the mean and group rows."""
        per_set = {name: ood_metrics(scores["id"], s) for name, s in scores.items() if name != "id"}
        self.scores.setdefault(split, {})[scorer] = scores
        self.rows += [
            {"split": split, "scorer": scorer, "dataset": name, **m} for name, m in per_set.items()
        ]
        self.rows += _summary_rows(per_set, benchmark, split, scorer)


def _summary_rows(
    per_set: dict[str, dict[str, float]], benchmark: Benchmark, split: str, scorer: str
) -> list[dict]:
    """Rows for the mean over headline sets and for each named group."""
    groups = {"mean": [n for n in per_set if n not in benchmark.excluded_from_mean]}
    if split == "test":
        groups.update(
            {g: [n for n in members if n in per_set] for g, members in benchmark.ood_groups.items()}
        )
    rows = []
    for name, members in groups.items():
        if members:
            rows.append(
                {
                    "split": split,
                    "scorer": scorer,
                    "dataset": name,
                    **{m: float(np.mean([per_set[s][m] for s in members])) for m in METRIC_NAMES},
                }
            )
    return rows


class Evaluator:
    """Holds a model, a benchmark and scorers; computes each dataset's outputs once.

    Streamed data is decoded in ``workers`` processes. With ``fit_samples``, scorers fit on a
    class-stratified sample of that many ID training images (seeded by ``seed``,
    :func:`~unleash_ood.data.noise.stratified_subset`), so fitting never forwards, holds or
    searches more than that: the k-NN bank is that sample, and Mahalanobis, ViM and ReAct
    take their statistics from it. ``cache_fp16`` stores cached features in float16.
    """

    def __init__(
        self,
        model: Classifier,
        benchmark: Benchmark,
        scorers: Sequence[Scorer | str] | str = "all",
        device: str | torch.device = "auto",
        batch_size: int = 512,
        cache_dir: str | Path | None = None,
        progress: bool = True,
        autocast: str = "none",
        workers: int = 0,
        fit_samples: int | None = None,
        seed: int = 0,
        cache_fp16: bool = False,
    ):
        check_fits(model, benchmark)
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.autocast = autocast_dtype(autocast, self.device)
        self.model = prepare_model(model, self.device).eval()
        self.benchmark = benchmark
        every = isinstance(scorers, str) and scorers.strip() == "all"
        self.scorers = as_scorers(scorers)
        if every:
            self.scorers = applicable_scorers(self.model, self.scorers)
        self.batch_size = batch_size
        self.cache = OutputCache(cache_dir, model, cache_fp16) if cache_dir else None
        self.dist = current_dist()
        self.progress = progress and self.dist.main
        self.workers, self.fit_samples, self.seed = workers, fit_samples, seed
        self._outputs: dict[str, Outputs] = {}
        check_feature_maps(self.model, self.scorers)
        sizes = {"train": len(self.fit_set()), "val": len(benchmark.id_val)}
        self.scorers = fittable_scorers(self.scorers, sizes, every)

    def _summaries(self) -> list[str]:
        """The feature-map summaries the current scorers read, in first-use order."""
        return list(dict.fromkeys(n for s in self.scorers for n in s.map_summaries))

    def outputs(self, key: str, data: ImageData) -> Outputs:
        needed = self._summaries()
        if key not in self._outputs or not set(needed) <= set(self._outputs[key].summaries):
            # On disk the key names the data too: two benchmarks or data folders sharing a
            # cache folder must never get each other's outputs.
            disk_key = f"{key}-{data.fingerprint()}" if self.cache else key
            out = self.cache.get(disk_key) if self.cache else None
            if out is None or not set(needed) <= set(out.summaries):
                out = self._forward(data, needed)
                if self.cache and self.dist.main:
                    self.cache.put(disk_key, out)
            self._outputs[key] = out
        return self._outputs[key]

    def _shard(self, data: ImageData) -> ImageData:
        start, end = shard_bounds(len(data), self.dist.rank, self.dist.world)
        return data.subset(torch.arange(start, end))

    def _forward(self, data: ImageData, summaries: Sequence[str] = ()) -> Outputs:
        """The outputs of ``data`` (with the named feature-map ``summaries``): one forward
        pass, or this process's shard of it gathered with the others' under torchrun."""
        args = (self.device, self.batch_size, self.progress, self.autocast, self.workers, summaries)
        if self.dist.world == 1 or not len(data):
            return forward_outputs(self.model, data, *args)
        part = self._shard(data)
        # With more processes than samples a shard is empty; its process still sends empty
        # rows of every output's shape, taken from one sample.
        out = forward_outputs(
            self.model, part if len(part) else data.subset(torch.tensor([0])), *args
        )
        n, rows = len(data), len(part)

        def gather(t: torch.Tensor) -> torch.Tensor:
            return gather_rows(t[:rows], n, self.dist, self.device)

        kept = {name: gather(t) for name, t in out.summaries.items()}
        return Outputs(gather(out.features), gather(out.logits), data.labels.clone(), kept)

    def reuse_outputs(self, other: Evaluator) -> None:
        """Take the outputs ``other`` computed (same model), sparing their forward passes."""
        self._outputs.update(other._outputs)

    def _scores(self, scorer: Scorer, key: str, data: ImageData) -> np.ndarray:
        if scorer.needs_model and self.dist.world > 1:
            part = self._shard(data)
            s = torch.empty(0, dtype=torch.float64)
            if len(part):
                s = model_scores(
                    scorer, self.model, part, self.device, self.batch_size, workers=self.workers
                ).double()
            s = gather_rows(s, len(data), self.dist, self.device)
        elif scorer.needs_model:
            s = model_scores(
                scorer,
                self.model,
                data,
                self.device,
                self.batch_size,
                self.progress,
                self.workers,
            )
        else:
            s = scorer.score(self.outputs(key, data), self.model.head)
            release_freed_memory()  # a scorer's row blocks, freed, stay in the C heap
        return s.double().cpu().numpy()

    def _fit(self) -> None:
        """Fit each scorer on its ID split: training, or validation for calibration-style
        statistics (``Scorer.fit_split``); never on a test set."""
        b = self.benchmark
        fit_sets = {"train": ("id_train", self.fit_set()), "val": ("id_val", b.id_val)}
        for scorer in self.scorers:
            if scorer.requires_fit:
                scorer.fit(self.outputs(*fit_sets[scorer.fit_split]), self.model.head)

    def fit_set(self) -> ImageData:
        """ID training data, or its stratified sample of ``fit_samples`` images."""
        train = self.benchmark.id_train
        if self.fit_samples is None or self.fit_samples >= len(train):
            return train
        labels = train.labels.numpy()
        return train.subset(stratified_subset(labels, self.fit_samples, self.seed, "fit-samples"))

    def run(self, splits: Sequence[str] = ("test",)) -> Evaluation:
        bad = [s for s in splits if s not in SPLITS]
        if bad:
            raise UserError(f"unknown split {bad[0]!r}; choose from {', '.join(SPLITS)}")
        b = self.benchmark
        self._fit()
        id_sets = {"test": ("id_test", b.id_test), "val": ("id_val", b.id_val)}
        ood_sets = {"test": b.ood_test, "val": b.ood_val}
        acc = {
            f"id_{split}": accuracy(self.outputs(*id_sets[split]).logits, id_sets[split][1].labels)
            for split in splits
        }
        result = Evaluation(b.name, acc)
        for split in splits:
            if not ood_sets[split]:
                continue
            for scorer in self.scorers:
                scores = {"id": self._scores(scorer, *id_sets[split])}
                scores.update(
                    {
                        name: self._scores(scorer, f"{split}-{name}", data)
                        for name, data in ood_sets[split].items()
                    }
                )
                result.add_scores(split, scorer.name, scores, b)
        return result


def evaluate(
    model: Classifier,
    benchmark: Benchmark,
    scorers: Sequence[Scorer | str] | str = "all",
    splits: Sequence[str] = ("test",),
    tune: bool = False,
    grids: dict[str, Grid] | None = None,
    **kwargs,
) -> Evaluation:
    """Evaluate ``model`` on ``benchmark`` with ``scorers``; see :class:`Evaluator`.

    With ``tune``, scorers with hyperparameters first take the values that do best on the
    validation data (:mod:`unleash_ood.tune`; ``grids`` replaces the default grid of the
    scorers it names), searched on an evaluator that holds no test set; the choices are in
    the result's ``tuning``.
    """
    evaluator = Evaluator(model, benchmark, scorers, **kwargs)
    tuning = {}
    if tune:
        searcher = Evaluator(model, validation_view(benchmark), [], **kwargs)
        evaluator.scorers, tuning = tune_scorers(searcher, evaluator.scorers, grids)
        evaluator.reuse_outputs(searcher)
    result = evaluator.run(splits)
    result.tuning = tuning
    return result
