"""Related systems that act on a classifier, on the fmnist suite: Watermarking (MSP and
Energy patterns on the frozen model), WOODS and SCONE (fine-tunes on a wild mix), beside the
plain fine-tune with the same recipe and the starting model itself.

    python benchmarks/related.py [--start fmnist_cnn] [--seeds 0 1 2] [--systems ...]
                                 [--resume] [--smoke]

Every arm runs as an ``unleash`` subprocess (``watermark``, ``finetune``, ``evaluate``), so its
wall time and peak resident memory (``os.wait4``) are its own. Each model is evaluated with
MSP, Energy and a panel of post-hoc scorers on the OOD validation and test sets; the best
post-hoc scorer of a model is the one with the best mean AUROC on the *validation* sets, and
only its test figures are reported. Training arms run once per seed; the cost of a
watermark is set against plain evaluation of the starting model, the cost of WOODS / SCONE
against the plain CE fine-tune. ``--resume`` skips every arm whose outputs exist, and every
arm that ``<out>.json`` records (with the same ``--epochs``) though its run folder is gone:
its recorded row stays in the tables and it is not trained again.
The arms run cheapest first: the ``paper-oe`` fine-tunes of every seed, then the watermarks
(each 50 epochs of sharpness-aware steps on ID and noise batches, far more than a fine-tune).
``--systems`` runs some systems only; the tables hold every arm finished so far, run now or
before, and are rewritten after each arm (a watermark takes hours). ``--smoke`` runs the
mechanics in minutes (one seed, one epoch, a small CNN pretrained on 1000 images, few scorers)
into ``runs/related-smoke``; its figures are not results.

Writes ``<out>.md`` and ``<out>.json`` (default ``benchmarks/results/related``); the runs
themselves go under ``--runs`` (default ``runs/related``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from _common import METRICS, summarise

from unleash_ood.checkpoint import atomic_write_json
from unleash_ood.report import markdown_table, mean_std

POSTHOC = "msp,energy,maxlogit,gen,mahalanobis,knn,vim,react,rmds,she"
SMOKE_POSTHOC = "msp,energy,maxlogit,knn"
WILD_PI = "0.1"
# In the tables' order.
SYSTEMS = ("start", "ce", "woods", "scone", "watermark-msp", "watermark-energy")
# What each trained system is paired against: the CE fine-tune of the same seed and recipe for
# the wild-mix fine-tunes, the frozen starting model itself for the watermarks.
CONTROL = {"woods": "ce", "scone": "ce", "watermark-msp": "start", "watermark-energy": "start"}


def unleash(argv: list[str], log: Path) -> dict[str, float]:
    """Run ``unleash argv`` to completion; its wall seconds and peak RSS in MiB."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "unleash_ood", *argv],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"unleash {' '.join(argv)} failed; see {log}")
    return {"seconds": seconds, "peak_mib": usage.ru_maxrss / 1024}


def timed(out: Path, argv: list[str], done: Path, resume: bool) -> dict[str, float]:
    """``unleash argv`` unless ``done`` exists (with --resume); its cost, kept in cost.json."""
    cost_file = out / "cost.json"
    if resume and done.exists() and cost_file.exists():
        return json.loads(cost_file.read_text())
    if out.exists():
        shutil.rmtree(out)  # an unfinished arm starts again
    cost = unleash(argv, out.with_suffix(".log"))
    atomic_write_json(cost_file, cost)
    return cost


def evaluate_arm(checkpoint: Path, out: Path, common: list[str], scorers: str, resume: bool):
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--scores", scorers]
    argv += ["--splits", "val,test", "--out", str(out), *common]
    cost = timed(out, argv, out / "metrics.json", resume)
    return json.loads((out / "metrics.json").read_text()), cost


def best_posthoc(evaluation: dict) -> str:
    """The scorer with the best mean AUROC on the OOD validation sets."""
    rows = [r for r in evaluation["rows"] if r["split"] == "val" and r["dataset"] == "mean"]
    return max(rows, key=lambda r: r["auroc"])["scorer"]


def arms(args: argparse.Namespace) -> list[tuple[str, int | None, list[str] | None]]:
    """(name, seed, training argv without --out) of every arm, cheapest first: the
    fine-tunes of every seed before any watermark; None: no training."""
    listed: list[tuple[str, int | None, list[str] | None]] = [("start", None, None)]
    for seed in args.seeds:
        for method in ("ce", "woods", "scone"):
            wild = ["--outliers", method, "--wild-pi", WILD_PI] if method != "ce" else []
            argv = ["finetune", "--method", "ce", "--recipe", "paper-oe", *wild]
            listed.append((method, seed, [*argv, "--seed", str(seed)]))
    for seed in args.seeds:
        for score in ("msp", "energy"):
            argv = ["watermark", "--score", score, "--seed", str(seed)]
            listed.append((f"watermark-{score}", seed, argv))
    return listed


def finished(folder: Path, trains: bool) -> bool:
    """Whether an arm's training (if any) and evaluation both completed."""
    parts = [folder / "eval" / "metrics.json", folder / "eval" / "cost.json"]
    if trains:
        parts += [folder / "run" / "checkpoints" / "final.json", folder / "run" / "cost.json"]
    return all(part.exists() for part in parts)


def run_arm(
    args: argparse.Namespace, name: str, seed: int | None, train: list[str] | None, resume: bool
) -> dict:
    """Train (if the arm trains anything) and evaluate one arm, or read it back when it has
    finished and ``resume`` holds; its row of the tables."""
    common = ["--device", "cpu", "--no-progress", *args.data]
    folder = args.runs / (name if seed is None else f"{name}-seed{seed}")
    checkpoint = Path(args.start)
    cost = None
    if train is not None:
        epochs = ["--epochs", str(args.epochs)] if args.epochs else []
        argv = [*train, *epochs, "--from", args.start, "--out", str(folder / "run"), *common]
        checkpoint = folder / "run" / "checkpoints" / "final"
        cost = timed(folder / "run", argv, checkpoint.with_suffix(".json"), resume)
    scorers = SMOKE_POSTHOC if args.smoke else POSTHOC
    evaluation, eval_cost = evaluate_arm(checkpoint, folder / "eval", common, scorers, resume)
    best = best_posthoc(evaluation)
    print(f"{folder.name}: done (best post-hoc on validation: {best})", flush=True)
    return {
        "seed": seed,
        "train_cost": cost,
        "eval_cost": eval_cost,
        "best_posthoc": best,
        **{s: summarise(evaluation, s) for s in ("msp", "energy", best)},
    }


def recorded_rows(args: argparse.Namespace) -> dict[tuple[str, int | None], dict]:
    """The row of every arm ``<out>.json`` records, by (system, seed); none when it holds a
    smoke run or arms of another ``--epochs``."""
    path = Path(f"{args.out}.json")
    if args.smoke or not path.exists():
        return {}
    recorded = json.loads(path.read_text())
    if recorded["smoke"] or recorded.get("epochs") != args.epochs:  # absent: defaults
        return {}
    return {(name, row["seed"]): row for name, rs in recorded["results"].items() for row in rs}


def grouped(rows: dict[tuple[str, int | None], dict]) -> dict[str, list[dict]]:
    """Rows by system, in the tables' order, each system's seeds ascending."""
    out: dict[str, list[dict]] = {}
    for name, seed in sorted(
        rows, key=lambda k: (SYSTEMS.index(k[0]), -1 if k[1] is None else k[1])
    ):
        out.setdefault(name, []).append(rows[(name, seed)])
    return out


def run_all(args: argparse.Namespace, write: Callable[[dict[str, list[dict]]], None]) -> None:
    """Run the arms of ``--systems``; ``write`` gets the rows of every finished arm, run now or
    before, first from what has finished or is recorded (so a rerun never drops an arm from
    the tables), then again after each arm that runs."""
    rows = recorded_rows(args)
    pending = []
    for name, seed, train in arms(args):
        folder = args.runs / (name if seed is None else f"{name}-seed{seed}")
        selected = name in args.systems
        if finished(folder, train is not None) and (args.resume or not selected):
            rows[(name, seed)] = run_arm(args, name, seed, train, resume=True)
        elif selected and not (args.resume and (name, seed) in rows):
            pending.append((name, seed, train))
    write(grouped(rows))
    for name, seed, train in pending:
        rows[(name, seed)] = run_arm(args, name, seed, train, resume=args.resume)
        write(grouped(rows))


def tables(results: dict[str, list[dict]]) -> str:
    rows = []
    for name, runs in results.items():
        for label in ("msp", "energy", "best post-hoc"):
            key = [r["best_posthoc"] if label == "best post-hoc" else label for r in runs]
            vals = [r[k] for r, k in zip(runs, key, strict=True)]
            shown = (
                label
                if label != "best post-hoc"
                else f"best post-hoc ({'/'.join(sorted(set(key)))})"
            )
            cells = [mean_std([v[m] for v in vals]) for m in ("acc", *METRICS)]
            seeds = ",".join("-" if r["seed"] is None else str(r["seed"]) for r in runs)
            rows.append([name, shown, seeds, *cells])
    metric_table = markdown_table(
        ["system", "scorer", "seeds", "ID acc", "AUROC", "FPR95 (ID+)", "FPR95 (OOD+)"], rows
    )
    cost_rows = []
    for name, runs in results.items():
        train = [r["train_cost"] for r in runs if r["train_cost"]]
        ev = [r["eval_cost"] for r in runs]
        ratios = [
            r["train_cost"]["seconds"] / (c["train_cost"] or c["eval_cost"])["seconds"]
            for r in runs
            if r["train_cost"] and (c := control_run(results, name, r)) is not None
        ]
        cost_rows.append(
            [
                name,
                mean_std([c["seconds"] for c in train]) if train else "-",
                mean_std(ratios),
                mean_std([c["peak_mib"] for c in train]) if train else "-",
                mean_std([c["seconds"] for c in ev]),
                mean_std([c["peak_mib"] for c in ev]),
            ]
        )
    cost_table = markdown_table(
        [
            "system",
            "train s",
            "train s / control's",
            "train peak MiB",
            "evaluate s",
            "evaluate peak MiB",
        ],
        cost_rows,
    )
    cost_title = (
        "### Cost (wall time, peak resident memory of the process; a system's training time "
        "against its control's of the same seed: the CE fine-tune's training, or the start's "
        "evaluation for a watermark)"
    )
    paired_title = (
        "### Paired differences (system minus its control: the CE fine-tune of the same seed, "
        "or the starting model for a watermark; mean ± std over the seeds both finished)"
    )
    return (
        f"{metric_table}\n\n{paired_title}\n\n{paired(results)}\n\n{cost_title}\n\n{cost_table}\n"
    )


def control_run(results: dict[str, list[dict]], name: str, run: dict) -> dict | None:
    """The run that ``run`` of system ``name`` is paired with: its ``CONTROL``'s run of the
    same seed, or the control's one run (the start); None without one."""
    control = {r["seed"]: r for r in results.get(CONTROL.get(name, ""), [])}
    return control.get(run["seed"]) or control.get(None)


def paired(results: dict[str, list[dict]]) -> str:
    """Each trained system's MSP and Energy figures minus its ``CONTROL``'s, seed by seed,
    and on how many seeds its FPR95 (ID+) is the lower."""
    rows = []
    for name, runs in results.items():
        pairs = [(r, c) for r in runs if (c := control_run(results, name, r)) is not None]
        if not pairs:
            continue
        seeds = ",".join(str(r["seed"]) for r, _ in pairs)
        for label in ("msp", "energy"):
            diffs = {m: [r[label][m] - c[label][m] for r, c in pairs] for m in ("acc", *METRICS)}
            lower = sum(d < 0 for d in diffs["fpr95_id"])
            rows.append(
                [
                    f"{name} - {CONTROL[name]}",
                    label,
                    seeds,
                    *(mean_std(diffs[m]) for m in ("acc", *METRICS)),
                    f"{lower}/{len(pairs)}",
                ]
            )
    if not rows:
        return "(no system has finished beside its control yet)"
    head = ["difference", "scorer", "seeds", "ID acc", "AUROC", "FPR95 (ID+)", "FPR95 (OOD+)"]
    return markdown_table([*head, "FPR95 (ID+) lower in"], rows)


def smoke_start(args: argparse.Namespace) -> None:
    """Smoke settings: one seed, one epoch, few scorers, and as start a width-4 CNN
    pretrained for one epoch on 1000 images (its fine-tunes and watermark train on them)."""
    args.seeds, args.epochs = args.seeds[:1], 1
    args.runs = args.runs.with_name("related-smoke")
    args.out = str(args.runs / "related")  # never over the study's results
    run = args.runs / "start-model"
    argv = ["pretrain", "--train-size", "1000", "--epochs", "1", "--model-arg", "width=4"]
    argv += ["--batch-size", "100", "--out", str(run), "--device", "cpu", *args.data]
    timed(run, argv, run / "checkpoints" / "last.json", args.resume)
    args.start = str(run / "checkpoints" / "last")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--start", default="fmnist_cnn", help="the well-trained model")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--systems",
        type=lambda v: v.split(","),
        default=list(SYSTEMS),
        help=f"comma-separated, of {','.join(SYSTEMS)} (default: all)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="override every arm's epochs (one value per --runs folder)",
    )
    p.add_argument("--runs", type=Path, default=Path("runs/related"))
    p.add_argument("--out", default="benchmarks/results/related")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--resume", action="store_true", help="skip every arm already finished")
    p.add_argument("--smoke", action="store_true", help="mechanics only: figures are not results")
    args = p.parse_args()
    args.data = ["--data-dir", args.data_dir] if args.data_dir else []
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown:
        p.error(f"--systems takes {','.join(SYSTEMS)}, not {','.join(unknown)}")
    if args.smoke:
        smoke_start(args)
    check_epochs(args)
    run_all(args, partial(write_tables, args))
    print(Path(f"{args.out}.md").read_text())


def check_epochs(args: argparse.Namespace) -> None:
    """Keep one ``--epochs`` per runs folder: finished arms are read back, not retrained, so
    arms of other lengths must not end up in one table."""
    record = args.runs / "epochs.json"
    if record.exists():
        epochs = json.loads(record.read_text())["epochs"]
        if epochs != args.epochs:
            raise SystemExit(
                f"{args.runs} holds arms trained with --epochs {epochs}, not {args.epochs}; "
                "give another --runs"
            )
    else:
        args.runs.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record, {"epochs": args.epochs})


def write_tables(args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    """``<out>.md`` and ``<out>.json`` from the rows of every finished arm."""
    title = "## Related systems on fmnist" + (" (SMOKE TEST: not results)" if args.smoke else "")
    if args.epochs and not args.smoke:
        title += f", every trained arm cut to {args.epochs} epochs"
    text = (
        f"{title}\n\nFrom {args.start}; every arm finished so far (seeds per row; "
        f"'-': the starting model, trained on nothing); mean ± std over seeds.\n\n"
        f"{tables(results)}"
    )
    Path(f"{args.out}.md").parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(text)
    atomic_write_json(
        Path(f"{args.out}.json"), {"smoke": args.smoke, "epochs": args.epochs, "results": results}
    )


if __name__ == "__main__":
    main()
