"""Tables (Markdown, CSV, JSON) and plots of evaluations. Reports show metrics x100.

matplotlib is imported by the plotting functions, on first use, and the backend is never set
here: importing this module changes nothing for a notebook user.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from unleash_ood.checkpoint import atomic_write_bytes, atomic_write_json
from unleash_ood.evaluate import CHANCE, Evaluation
from unleash_ood.metrics import METRIC_NAMES
from unleash_ood.tables import ResultsTable as ResultsTable
from unleash_ood.tables import markdown_table as markdown_table
from unleash_ood.tables import mean_std as mean_std

HEADERS = {
    "auroc": "AUROC",
    "fpr95_id": "FPR95 (ID+)",
    "fpr95_ood": "FPR95 (OOD+)",
    "aupr_in": "AUPR-In",
    "aupr_out": "AUPR-Out",
    "detection_error": "Det.Err",
}
LEGEND = (
    "Metrics x100. FPR95 (ID+): OOD accepted at 95 % ID recall (the paper's). "
    "FPR95 (OOD+): ID rejected at 95 % OOD recall (OpenOOD v1.5). "
    "Threshold: accept as ID when score >= t, t over distinct scores."
)


def _metric_rows(ev: Evaluation, split: str, datasets: Sequence[str] | None = None) -> list[list]:
    return [
        [r["scorer"], r["dataset"], *(100 * r[m] for m in METRIC_NAMES)]
        for r in ev.rows
        if r["split"] == split and (datasets is None or r["dataset"] in datasets)
    ]


def evaluation_markdown(ev: Evaluation, summary_only: bool = False) -> str:
    """The whole evaluation as Markdown; ``summary_only`` keeps the mean and group rows."""
    parts = [
        f"# {ev.benchmark}",
        "",
        ", ".join(f"{k} accuracy {100 * v:.2f}" for k, v in ev.accuracy.items()),
        "",
    ]
    splits = list(dict.fromkeys(r["split"] for r in ev.rows))
    for split in splits:
        names = (
            [
                n
                for n in dict.fromkeys(r["dataset"] for r in ev.rows)
                if n == "mean" or n in ("near", "far")
            ]
            if summary_only
            else None
        )
        parts += [
            f"## OOD {split}",
            "",
            markdown_table(
                ["scorer", "OOD set", *(HEADERS[m] for m in METRIC_NAMES)],
                _metric_rows(ev, split, names),
            ),
            "",
        ]
    if len(ev.scorers()) > 1:
        parts += ["## Ranking: mean over OOD test sets", "", ranking_markdown(ev), ""]
    if ev.tuning:
        parts += ["## Chosen on OOD validation data (--tune)", "", tuning_markdown(ev), ""]
    parts.append(LEGEND)
    return "\n".join(parts) + "\n"


def tuning_markdown(ev: Evaluation) -> str:
    rows = [
        [
            name,
            _params_cell(t),
            100 * t["val_auroc"],
            "; ".join(
                f"{p}: {', '.join(f'{v:g}' for v in values)}" for p, values in t["grid"].items()
            ),
        ]
        for name, t in ev.tuning.items()
    ]
    return markdown_table(["scorer", "chosen", "val AUROC", "grid"], rows)


RANKED = ("auroc", "fpr95_id", "fpr95_ood", "aupr_in", "aupr_out")


def ranking_markdown(ev: Evaluation) -> str:
    """Scorers by mean OOD-test AUROC, both FPR95 conventions beside it, tuned values and a flag
    for scorers below chance."""
    rows = [
        [
            i,
            r["scorer"] + (" (below chance)" if r["below_chance"] else ""),
            *(100 * r[m] for m in RANKED),
            _params_cell(ev.tuning.get(r["scorer"])),
        ]
        for i, r in enumerate(ev.ranking(), start=1)
    ]
    headers = ["rank", "scorer", *(HEADERS[m] for m in RANKED), "tuned on validation"]
    return markdown_table(headers, rows)


def _params_cell(tuned: dict | None) -> str:
    if not tuned:
        return "-"
    return ", ".join(f"{k}={v:g}" for k, v in tuned["params"].items())


def plot_ranking(ev: Evaluation, path: Path) -> None:
    """Mean AUROC and FPR95 (ID+) per scorer, best first; scorers below chance in red."""
    import matplotlib.pyplot as plt

    ranked = ev.ranking()[::-1]  # barh draws bottom-up
    if not ranked:
        return
    names = [r["scorer"] for r in ranked]
    colours = ["tab:red" if r["below_chance"] else "tab:blue" for r in ranked]
    fig, (ax_auc, ax_fpr) = plt.subplots(1, 2, sharey=True, figsize=(8, 1.2 + 0.24 * len(ranked)))
    ax_auc.barh(names, [100 * r["auroc"] for r in ranked], color=colours)
    ax_auc.axvline(100 * CHANCE, color="k", lw=0.8, ls="--")
    ax_auc.set_xlabel("mean AUROC (higher is better; dashed: chance)")
    ax_fpr.barh(names, [100 * r["fpr95_id"] for r in ranked], color=colours)
    ax_fpr.set_xlabel("mean FPR95, ID positive (lower is better)")
    for ax in (ax_auc, ax_fpr):
        ax.set_xlim(0, 100)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{ev.benchmark}: scorers ranked by mean AUROC over OOD test sets", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def evaluation_csv(ev: Evaluation) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["split", "scorer", "dataset", *METRIC_NAMES, *ev.accuracy])
    acc = [f"{100 * v:.4f}" for v in ev.accuracy.values()]
    for r in ev.rows:
        w.writerow(
            [
                r["split"],
                r["scorer"],
                r["dataset"],
                *(f"{100 * r[m]:.4f}" for m in METRIC_NAMES),
                *acc,
            ]
        )
    return buf.getvalue()


def plot_histograms(
    ev: Evaluation, path: Path, split: str = "test", model: str | None = None
) -> None:
    """One row per scorer, one panel per OOD set: ID vs OOD score histograms; ``model``
    names the model in the title.

    Each histogram is one filled step outline (``stairs``), not a bar per bin, and the margins
    are fixed in inches rather than found by ``tight_layout``: with every scorer (over 150
    panels) this draws in a fraction of the time, at the same look."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    by_scorer = ev.scores.get(split, {})
    if not by_scorer:
        return
    ood_names = [n for n in next(iter(by_scorer.values())) if n != "id"]
    about = f"{model} on {ev.benchmark}" if model else ev.benchmark
    title = f"{about}: score histograms, ID ({split}) vs each OOD set"
    # Wide enough for the title (about 0.07 inch a character at 9 points) with few OOD sets.
    width, height = max(2.6 * len(ood_names), 0.07 * len(title)), 1.9 * len(by_scorer)
    fig, axes = plt.subplots(len(by_scorer), len(ood_names), squeeze=False, figsize=(width, height))
    fig.subplots_adjust(
        left=0.3 / width,
        right=1 - 0.1 / width,
        bottom=0.3 / height,
        top=1 - 0.6 / height,
        wspace=0.1,
        hspace=0.45,
    )
    for i, (scorer, scores) in enumerate(by_scorer.items()):
        for j, name in enumerate(ood_names):
            ax = axes[i, j]
            lo = min(scores["id"].min(), scores[name].min())
            hi = max(scores["id"].max(), scores[name].max())
            bins = 50 if hi > lo else 1
            for values, label in ((scores["id"], "ID"), (scores[name], "OOD")):
                counts, edges = np.histogram(values, bins=bins, range=(lo, hi), density=True)
                ax.stairs(counts, edges, fill=True, alpha=0.55, label=label)
            ax.set_yticks([])
            # Three ticks at most: scores such as ODIN's differ in the fifth digit, and more
            # ticks of such long labels overlap in a narrow panel.
            ax.xaxis.set_major_locator(MaxNLocator(nbins=3))
            ax.tick_params(labelsize=6)
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0:
                ax.set_ylabel(scorer, fontsize=8)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9, y=1 - 0.08 / height, va="top")
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as a PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_evaluation(
    ev: Evaluation, out: Path, config: dict | None = None, model: str | None = None
) -> None:
    """DIR/metrics.json (fractions), metrics.md and metrics.csv (x100), histograms.png, and
    ranking.png when there is more than one scorer; ``model`` names the model in the plots."""
    out.mkdir(parents=True, exist_ok=True)
    if config is not None:
        atomic_write_json(out / "config.json", config)
    atomic_write_json(out / "metrics.json", {**ev.to_dict(), "scale": "fraction"})
    atomic_write_bytes(out / "metrics.md", evaluation_markdown(ev).encode())
    atomic_write_bytes(out / "metrics.csv", evaluation_csv(ev).encode())
    plot_histograms(ev, out / "histograms.png", model=model)
    if len(ev.scorers()) > 1:
        plot_ranking(ev, out / "ranking.png")
