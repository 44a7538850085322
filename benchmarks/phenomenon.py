"""Does an intermediate epoch detect OOD better than the final one? (the paper's observation)

    python benchmarks/phenomenon.py --runs RUN [RUN ...] [--train] [--seeds 0 1 2]

With ``--train``, each missing run ``runs/phenomenon/seed<k>`` is trained with the default
recipe (``unleash pretrain --seed k --track --recompute-bn``); otherwise the given runs are
tracked if they have no track.csv yet. For each run it compares the final epoch with the epoch
selected on validation data only (best 3-epoch-window mean OOD-validation Energy AUROC among
epochs within one point of the best ID validation accuracy), on the OOD *test* sets, and
reports the epoch-to-epoch noise of the same metrics. Writes a Markdown table and a plot.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

from unleash_ood.report import markdown_table, save_figure
from unleash_ood.track import curve, per_epoch, read_track_csv, select_epoch

SCORERS = ("energy", "msp")


def ensure_tracked(run: Path, seed: int | None, train: bool) -> None:
    if not (run / "checkpoints").exists():
        if not train:
            sys.exit(f"{run} has no checkpoints; pass --train to train it")
        subprocess.run(
            [
                "unleash",
                "pretrain",
                "--seed",
                str(seed),
                "--out",
                str(run),
                "--track",
                "--recompute-bn",
                "--no-progress",
            ],
            check=True,
        )
    if not (run / "track.csv").exists():
        subprocess.run(
            ["unleash", "track", str(run), "--recompute-bn", "--no-progress"], check=True
        )


def at_epoch(rows: list[dict], epoch: int, scorer: str) -> dict:
    r = next(
        r
        for r in rows
        if (r["epoch"], r["split"], r["scorer"], r["dataset"]) == (epoch, "test", scorer, "mean")
    )
    return {
        "acc": 100 * r["id_test_acc"],
        "auroc": 100 * r["auroc"],
        "fpr95_id": 100 * r["fpr95_id"],
    }


def noise(rows: list[dict], scorer: str, last: int = 10) -> dict:
    """Mean |change| between consecutive epochs, and the std over the last ``last`` epochs."""
    _, auroc = curve(rows, "test", scorer, "auroc")
    _, fpr = curve(rows, "test", scorer, "fpr95_id")
    return {
        "step_auroc": 100 * np.abs(np.diff(auroc)).mean(),
        "tail_std_auroc": 100 * auroc[-last:].std(),
        "step_fpr": 100 * np.abs(np.diff(fpr)).mean(),
        "tail_std_fpr": 100 * fpr[-last:].std(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="*", default=None)
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--train", action="store_true")
    p.add_argument("--out", default="benchmarks/results/phenomenon")
    args = p.parse_args()
    runs = (
        [Path(r) for r in args.runs]
        if args.runs
        else [Path(f"runs/phenomenon/seed{s}") for s in args.seeds]
    )
    for i, run in enumerate(runs):
        ensure_tracked(run, args.seeds[i] if i < len(args.seeds) else i, args.train)

    table, noise_rows, per_run = [], [], {}
    for run in runs:
        rows = read_track_csv(run / "track.csv")
        sel = select_epoch(rows)
        final = sel["final_epoch"]
        per_run[run.name] = rows
        _, loss = per_epoch(rows, "train_loss")
        for scorer in SCORERS:
            f, s = at_epoch(rows, final, scorer), at_epoch(rows, sel["selected_epoch"], scorer)
            table.append(
                [
                    run.name,
                    scorer,
                    final,
                    f["acc"],
                    f["auroc"],
                    f["fpr95_id"],
                    sel["selected_epoch"],
                    s["acc"],
                    s["auroc"],
                    s["fpr95_id"],
                    s["auroc"] - f["auroc"],
                    s["fpr95_id"] - f["fpr95_id"],
                ]
            )
            n = noise(rows, scorer)
            noise_rows.append(
                [
                    run.name,
                    scorer,
                    f"{loss[-1]:.4f}",
                    n["step_auroc"],
                    n["tail_std_auroc"],
                    n["step_fpr"],
                    n["tail_std_fpr"],
                ]
            )
    for scorer in SCORERS:
        sub = np.array([r[3:] for r in table if r[1] == scorer], dtype=float)
        mean, std = sub.mean(0), sub.std(0)
        cells = [f"{m:.2f} ± {s:.2f}" for m, s in zip(mean, std, strict=True)]
        cells[3] = f"{mean[3]:.0f} ± {std[3]:.1f}"  # the selected epoch
        finals = {r[2] for r in table if r[1] == scorer}
        table.append([f"mean ± std ({len(sub)})", scorer, "/".join(map(str, finals)), *cells])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    headers = [
        "run",
        "scorer",
        "final ep",
        "acc",
        "AUROC",
        "FPR95(ID+)",
        "selected ep",
        "acc",
        "AUROC",
        "FPR95(ID+)",
        "ΔAUROC",
        "ΔFPR95",
    ]
    md = [
        "## Final vs validation-selected epoch (OOD test sets, mean without noise)",
        "",
        markdown_table(headers, table),
        "",
        "## Epoch-to-epoch noise (OOD test, mean over sets)",
        "",
        markdown_table(
            [
                "run",
                "scorer",
                "final train loss",
                "mean |Δ| AUROC",
                "std AUROC last 10",
                "mean |Δ| FPR95",
                "std FPR95 last 10",
            ],
            noise_rows,
        ),
        "",
    ]
    Path(f"{out}.md").write_text("\n".join(md))
    print("\n".join(md))
    plot(per_run, Path(f"{out}.png"))


def plot(per_run: dict[str, list[dict]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for i, (name, rows) in enumerate(per_run.items()):
        c = f"C{i}"
        axes[0].plot(*per_epoch(rows, "train_loss"), color=c, label=name)
        axes[1].plot(*per_epoch(rows, "id_test_acc"), color=c)
        for ax, metric in ((axes[2], "auroc"), (axes[3], "fpr95_id")):
            ax.plot(*curve(rows, "test", "energy", metric), color=c)
            ax.plot(*curve(rows, "val", "energy", metric), "--", color=c, alpha=0.6)
        sel = select_epoch(rows)["selected_epoch"]
        axes[2].axvline(sel, color=c, lw=0.8, ls=":")
    axes[0].set_yscale("log")
    for ax, title in zip(
        axes,
        (
            "train loss",
            "ID test accuracy",
            "Energy mean AUROC (test solid, val dashed)",
            "Energy mean FPR95 (ID+)",
        ),
        strict=True,
    ):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
