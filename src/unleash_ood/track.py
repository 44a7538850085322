"""OOD metrics of every saved epoch: the paper's observation that an intermediate epoch
detects OOD better than the final one, made visible on the user's own model and data.

``track.csv`` is tidy: one row per (epoch, split, scorer, OOD set) with the epoch's training
loss and ID accuracies repeated, so it loads straight into a data frame. Selection of "the best
intermediate epoch" looks only at the OOD *validation* sets and the ID validation split.
"""

from __future__ import annotations

import copy
import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unleash_ood.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    epoch_checkpoints,
    load_checkpoint,
)
from unleash_ood.data.base import Benchmark, ImageData
from unleash_ood.device import to_device
from unleash_ood.evaluate import Evaluation, Evaluator
from unleash_ood.metrics import METRIC_NAMES
from unleash_ood.models import Classifier
from unleash_ood.report import save_figure
from unleash_ood.train import replay_saves

COLUMNS = (
    "epoch",
    "train_loss",
    "train_acc",
    "id_val_acc",
    "id_test_acc",
    "split",
    "scorer",
    "dataset",
    *METRIC_NAMES,
)


@torch.no_grad()
def recompute_batchnorm(
    model: Classifier,
    data: ImageData,
    device: torch.device,
    batch_size: int = 512,
    max_batches: int = 40,
    workers: int = 0,
) -> None:
    """Replace BatchNorm running statistics by their exact average over training batches
    (decoded in ``workers`` processes when streamed).

    Running averages lag behind the weights while the learning rate is high, so an epoch's
    eval-mode predictions carry noise that has nothing to do with what the weights learned.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    for i, (x, _) in enumerate(data.batches(batch_size, workers)):
        if i == max_batches:
            break
        model.features(to_device(x, device))
    for m, (momentum, training) in zip(bns, saved, strict=True):
        m.momentum = momentum
        m.train(training)


def evaluation_rows(ev: Evaluation, epoch: int, train_metrics: dict) -> list[dict]:
    base = {
        "epoch": epoch,
        "train_loss": train_metrics.get("train_loss", float("nan")),
        "train_acc": train_metrics.get("train_acc", float("nan")),
        "id_val_acc": ev.accuracy.get("id_val", float("nan")),
        "id_test_acc": ev.accuracy.get("id_test", float("nan")),
    }
    return [{**base, **r} for r in ev.rows]


class Tracker:
    """Evaluates one epoch's model on OOD val and test sets and keeps ``track.csv`` current;
    ``workers`` processes decode streamed images. Called for an epoch, it first tracks the
    earlier saved epochs ``track.csv`` lacks (:meth:`catch_up`)."""

    def __init__(
        self,
        benchmark: Benchmark,
        scorers: str,
        out: Path,
        device: torch.device,
        batch_size: int = 512,
        recompute_bn: bool = False,
        progress: bool = True,
        workers: int = 0,
    ):
        self.benchmark, self.scorers, self.out = benchmark, scorers, out
        self.device, self.batch_size, self.workers = device, batch_size, workers
        self.recompute_bn, self.progress = recompute_bn, progress
        existing = out / "track.csv"
        self.rows: list[dict] = read_track_csv(existing) if existing.exists() else []

    def __call__(self, epoch: int, model: Classifier, train_metrics: dict) -> None:
        self.catch_up(before=epoch)
        self.track(epoch, model, train_metrics)

    def catch_up(self, before: int | None = None) -> None:
        """Track the saved epochs of the run (those before ``before``) that ``track.csv``
        lacks: a run stopped between saving an epoch and tracking it, then resumed, would
        otherwise miss that epoch."""
        tracked = {r["epoch"] for r in self.rows}
        saved = epoch_checkpoints(self.out) if (self.out / "checkpoints").is_dir() else []
        for epoch, path in saved:
            if epoch not in tracked and (before is None or epoch < before):
                bench = self.benchmark
                model, meta = load_checkpoint(
                    path, self.device, bench.num_classes, bench.image_shape
                )
                self.track(epoch, model, meta.get("metrics", {}))

    def track(self, epoch: int, model: Classifier, train_metrics: dict) -> None:
        """Evaluate ``model`` as epoch ``epoch`` and rewrite track.csv, its plot and the
        selection."""
        if self.recompute_bn:  # on a copy: a training run's own statistics stay untouched
            model = copy.deepcopy(model)
            recompute_batchnorm(
                model, self.benchmark.id_train, self.device, self.batch_size, workers=self.workers
            )
        model.eval()
        ev = Evaluator(
            model,
            self.benchmark,
            self.scorers,
            device=self.device,
            batch_size=self.batch_size,
            progress=False,
            workers=self.workers,
        ).run(("val", "test"))
        self.rows = [r for r in self.rows if r["epoch"] != epoch]
        self.rows += evaluation_rows(ev, epoch, train_metrics)
        self.write()

    def write(self) -> None:
        atomic_write_bytes(self.out / "track.csv", rows_csv(self.rows).encode())
        plot_track(self.rows, self.out / "track.png", self.benchmark.name)
        atomic_write_json(self.out / "track_selection.json", select_epoch(self.rows))


def track_run(run: Path, tracker: Tracker) -> Tracker:
    """Evaluate every saved epoch of ``run``; writes track.csv, track.png, track_selection.json."""
    replay_saves(run, tracker, tracker.device, tracker.benchmark, tracker.progress)
    return tracker


def rows_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(sorted(rows, key=lambda r: r["epoch"]))
    return buf.getvalue()


def read_track_csv(path: Path) -> list[dict]:
    """Rows of a track.csv, numbers as numbers (so a resumed run keeps its earlier epochs)."""
    text = ("split", "scorer", "dataset")
    with open(path, newline="") as f:
        return [
            {k: (v if k in text else int(v) if k == "epoch" else float(v)) for k, v in r.items()}
            for r in csv.DictReader(f)
        ]


def curve(
    rows: Sequence[dict], split: str, scorer: str, metric: str, dataset: str = "mean"
) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of one metric, sorted by epoch."""
    pts = sorted(
        (r["epoch"], r[metric])
        for r in rows
        if (r["split"], r["scorer"], r["dataset"]) == (split, scorer, dataset)
    )
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def per_epoch(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted({r["epoch"]: r[key] for r in rows}.items())
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)


def window_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average (shrinking at the ends), to keep single noisy epochs from winning."""
    half = window // 2
    return np.array([values[max(0, i - half) : i + half + 1].mean() for i in range(len(values))])


@dataclass(frozen=True)
class SelectionRule:
    """Best window-averaged mean OOD-validation AUROC of ``scorer`` among epochs whose ID
    validation accuracy is within ``acc_tolerance`` of the run's best."""

    scorer: str = "energy"
    metric: str = "auroc"
    window: int = 3
    acc_tolerance: float = 0.01


def select_epoch(rows: Sequence[dict], rule: SelectionRule | None = None) -> dict:
    """Pick the intermediate epoch by validation data only; see :class:`SelectionRule`."""
    rule = rule or SelectionRule()
    scorers = {r["scorer"] for r in rows}
    if rule.scorer not in scorers:
        rule = SelectionRule(sorted(scorers)[0], rule.metric, rule.window, rule.acc_tolerance)
    epochs, values = curve(rows, "val", rule.scorer, rule.metric)
    if epochs.size == 0:
        return {"selected_epoch": None, "reason": "no OOD validation sets in this benchmark"}
    _, val_acc = per_epoch(rows, "id_val_acc")
    smooth = window_mean(values, rule.window)
    eligible = val_acc >= val_acc.max() - rule.acc_tolerance
    sign = -1 if rule.metric.startswith(("fpr", "detection")) else 1
    best = int(np.argmax(np.where(eligible, sign * smooth, -np.inf)))
    return {
        "selected_epoch": int(epochs[best]),
        "final_epoch": int(epochs[-1]),
        "rule": rule.__dict__,
        "val_metric_windowed": float(smooth[best]),
        "id_val_acc": float(val_acc[best]),
    }


def plot_track(rows: Sequence[dict], path: Path, title: str) -> None:
    """ID accuracy, mean AUROC and mean FPR95 (ID+) against epoch; solid test, dashed val."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    epochs, loss = per_epoch(rows, "train_loss")
    for key, style in (("id_val_acc", "--"), ("id_test_acc", "-")):
        axes[0].plot(*per_epoch(rows, key), style, label=key.replace("_acc", ""))
    ax_loss = axes[0].twinx()
    ax_loss.plot(epochs, loss, ":", color="grey", label="train loss")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("train loss (dotted)")
    axes[0].set_title("ID accuracy")
    axes[0].legend(fontsize=7)
    for ax, metric in zip(axes[1:], ("auroc", "fpr95_id"), strict=True):
        for i, scorer in enumerate(dict.fromkeys(r["scorer"] for r in rows)):
            for split, style in (("test", "-"), ("val", "--")):
                e, v = curve(rows, split, scorer, metric)
                if e.size:
                    ax.plot(e, v, style, color=f"C{i}", label=f"{scorer} ({split})")
        ax.set_title(f"mean {metric} over OOD sets")
        ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
